"""
The agent rollout engine (paper 2.1, Algorithm 1): generate multi-turn trajectories that stop exactly at an action, call
the tools for the rows that paused at that step, and prefill the observations into the same KV cache while the other
rows keep decoding. Token ids in, token ids and masks out (the one mask rule, SPEC 3, as model.encode_segments).

    from model import build_prompt, load
    from engine import rollout
    model, tok = load("ckpt/sft3")
    prompt = tok.encode(build_prompt(tok, "Who wrote Hamlet?"), add_special_tokens=False)
    rollouts = rollout(model, tok, [prompt] * 8, make_tools(corpus="data/corpus.jsonl"), env="real", temperature=0.6)

The engine (rollout) in one picture, per batch of rows (continuous batching: rows never wait for each other):
    prefill the prompts once -> loop { 1. sample one token per running row and record it; 2. stop checks on the device
    (eos, an action's close tag, budgets) and the one device->host copy of the step; 3. the state machine, on the host,
    for the rows with an event; 4. ONE batched tool call for the rows that paused on an action at this step; 5. queue
    the injected ids (observation, forced tags); 6. feed the cache: decoding rows their token (a forward over the
    batch), rows with an injection their sampled token + those ids as one chunk (a second forward over those rows
    only); 7. retire finished rows }.
The KV cache (_SlotCache) gives each row its own slots, so a forward can cover a subset of the rows and no row spends
cache on another row's padding.
naive_rollout() is the same state machine with no cache, one row at a time, a full forward per token: the test oracle.

What a model must support (check_model() checks it once per rollout() call and names what is missing):
- a torch module with parameters (the engine runs on their device) and get_output_embeddings() (its rows = vocab size);
- forward(input_ids=, attention_mask=, position_ids=, use_cache=, logits_to_keep=, cache= or past_key_values=) (or
  **kwargs that pass them on) -> an object with .logits (B, T, V): a Hugging Face causal LM (Llama, Qwen2, SmolLM2...);
- it must use the given position_ids and a ready 4-D attention_mask (B, 1, T, L) as they are, and call
  cache.update(key, value, layer_idx) once per layer with key/value (B, H, T, D) (the only Cache method it needs);
- the mask form follows model.config._attn_implementation: "eager" gets an additive float mask (0 or float32's min),
  "sdpa" (or no config) a boolean one. Other kernels (flash_attention_2, flex_attention) ignore or misread a 4-D mask
  and are refused: load the model with attn_implementation="sdpa" or call model.set_attn_implementation("sdpa").

How this departs from the paper / the original code, and why:
- The original (verl + vLLM) generated each turn to EOS or 2048 tokens, cut the text at the first action, decoded and
  re-encoded the whole context every turn. Here every row stops at the token that completes `</end_NAME>` (zero tokens
  past it), the prefix is never re-encoded, and masks come from token ids, never from re-tokenised text (SPEC 3).
- A close tag spelled as several text tokens is detected on the decoded tail of the current segment; a tag that is one
  special token is detected by id (no decode). With a BPE that merges the tag's last ">" with following characters
  (">\\n"), the row stops after that token: still zero tokens past it, the extra characters are part of that token.
- Forced answer at the budget (paper Algorithm 1, lines 24-27): `answer_tokens` (plus the few tokens of the forced tags)
  are reserved inside max_new_tokens / max_context; when a row still thinking runs out, "</think>\\n" is appended
  (loss_mask 0) and it writes at most answer_tokens more. A row that closed </think> itself may use the reserve.
- Tool calls are made at the step a row pauses, batched over the rows that paused at that same step (often one):
  nobody idles, at the price of smaller batches for a retrieval server's batch API.
- seed may be one int per prompt: each row then samples from its own generator, so its trajectory does not depend on
  the other rows of the batch (N-process RL == 1-process RL).
- env="sim" (RL stage 1): the policy writes the observation itself after "\\n<NAME_result>\\n" until it writes
  </NAME_result> (at most sim_obs_tokens, then the close is forced); those tokens are obs (loss_mask 0 unless
  train_sim_obs) and no tool is called.

No command of its own: scripts import it. (Distributed scripts call rollout() on the unwrapped model on every rank.)
"""
import inspect
from dataclasses import dataclass, field

import torch
import transformers
from transformers.cache_utils import Cache

from model import TOOLS_DISABLED, encode_observation
from tools import (LIMIT_MESSAGE, THINK_CLOSE, TOOL_NAMES, action_close, action_open, format_observation, result_close,
                   result_open)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# -----------------------------------------------------------------------------
# Results, per-row state and the state machine shared by the engine and the oracle

@dataclass
class Rollout:
    prompt_ids: list
    response_ids: list
    loss_mask: list        # 1 = the policy sampled it and it is trained on (SPEC 3)
    obs_mask: list         # 1 = observation (real, disabled/limit text, or simulated by the policy)
    logprobs: list         # log-prob of the sampled token under the distribution it was drawn from (logits / T,
                           # renormalised over the top-p nucleus); 0.0 where injected
    text: str              # decoded response (special tokens kept: the tags may be special tokens)
    policy_text: str       # the response as the POLICY wrote it: each observation replaced by its empty result block,
                           # so answer extraction and the format check never read tool output (OBSERVATION_STUB)
    num_actions: dict      # tool name -> actions the row emitted (past max_actions too)
    real_calls: int        # tool requests this row sent to the ToolRegistry (its cache may still answer some)
    sim_obs: int           # observations the policy wrote itself (env="sim")
    stop_reason: str       # "eos" | "max_new_tokens" | "max_context" | "forced_answer"


GEN, SIM, ANSWER, DONE = "gen", "sim", "answer", "done"  # row phases: thinking/acting, writing a sim observation,
                                                          # writing the forced answer, finished


@dataclass
class _Row:
    """Host-side state of one trajectory. Token counters are exact at every event (the engine syncs them then)."""
    prompt_len: int
    phase: str = GEN
    thought_closed: bool = False
    seg_start: int = 0      # response index where the current segment (policy text or sim observation) starts
    gen: int = 0            # tokens sampled
    length: int = 0         # response tokens: sampled + injected (queued injections included)
    phase_count: int = 0    # tokens sampled in the current phase
    sim_name: str = ""
    action: str = None      # tool name of the action waiting for the environment
    inject: list = field(default_factory=list)  # [(ids, loss, obs)] waiting to be prefilled
    num_actions: dict = field(default_factory=dict)
    real_calls: int = 0
    sim_obs: int = 0
    obs_names: list = field(default_factory=list)  # tool name of each observation, in order (for policy_text)
    stop_reason: str = ""


@dataclass
class _Setup:
    """Everything the state machine needs that depends only on the tokenizer and the rollout() arguments."""
    tokenizer: object
    env: str
    max_new_tokens: int
    max_actions: int
    max_context: int
    answer_tokens: int
    sim_obs_tokens: int
    train_sim_obs: bool
    tags: dict              # close tag text -> ("action"|"result"|"think", tool name)
    names: list
    think_ids: list         # "</think>\n", the forced-answer switch
    reserve: int            # context tokens kept free for the forced tags + answer


def _setup(tokenizer, tools, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
           train_sim_obs):
    if env not in ("real", "sim", "none"):
        raise ValueError(f"env must be 'real', 'sim' or 'none', got {env!r}")
    if env == "real" and tools is None:
        raise ValueError("env='real' needs tools (a ToolRegistry)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    if answer_tokens >= max_new_tokens:
        raise ValueError(f"answer_tokens ({answer_tokens}) must be < max_new_tokens ({max_new_tokens})")
    names = list(dict.fromkeys([*TOOL_NAMES, *getattr(tools, "names", ())]))
    tags = {THINK_CLOSE: ("think", None)}
    for name in names:
        tags[action_close(name)] = ("action", name)
        tags[result_close(name)] = ("result", name)
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    think_ids = enc(THINK_CLOSE + "\n")
    sim_tags = max(len(enc(f"\n{result_open(n)}\n")) + len(enc(result_close(n) + "\n")) for n in names)
    return _Setup(tokenizer, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
                  train_sim_obs, tags, names, think_ids, answer_tokens + len(think_ids) + sim_tags)


def _limits(row, s):
    """-> (max sampled tokens, max response length, max tokens in this phase) for the row's current phase."""
    big = 1 << 30
    if row.phase == ANSWER:
        return s.max_new_tokens, s.max_context - row.prompt_len, s.answer_tokens
    if row.phase == GEN and row.thought_closed:  # writing its own answer: the reserve is its to use
        return s.max_new_tokens, s.max_context - row.prompt_len, big
    cap = s.sim_obs_tokens if row.phase == SIM else big
    return s.max_new_tokens - s.answer_tokens, s.max_context - s.reserve - row.prompt_len, cap


def _out_of_budget(row, s):
    max_gen, max_len, max_phase = _limits(row, s)
    return row.gen >= max_gen or row.length >= max_len or row.phase_count >= max_phase


def _watched(row, s):
    """Close tags that end something for this row now."""
    if row.phase == GEN:
        return [t for t, (kind, _) in s.tags.items()
                if kind == "action" or (kind == "think" and not row.thought_closed)]
    if row.phase == SIM:
        return [result_close(row.sim_name)]
    return []


def _completed_tag(tokenizer, tail_ids, tags):
    """The tag in `tags` whose text the LAST token of tail_ids completes, else None. tail_ids must hold at least as
    many tokens as the longest tag has characters (+1), so the whole tag is inside the decoded window."""
    text = tokenizer.decode(tail_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    before = tokenizer.decode(tail_ids[:-1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return next((t for t in tags if t in text and t not in before), None)


def _queue(row, ids, loss, obs):
    row.inject.append((list(ids), loss, obs))
    row.length += len(ids)


def _settle(row, s):
    """Apply the budget rules until the row may sample again (or is done): close a sim observation that ran out, force
    the answer for a row still thinking (Algorithm 1, lines 24-27), stop a row that is answering."""
    while row.phase != DONE and _out_of_budget(row, s):
        if row.phase == SIM:
            _queue(row, s.tokenizer.encode(result_close(row.sim_name) + "\n", add_special_tokens=False), 0, 1)
            row.phase, row.phase_count, row.seg_start = GEN, 0, row.length
        elif row.phase == GEN and not row.thought_closed:
            _queue(row, s.think_ids, 0, 0)
            row.phase, row.thought_closed, row.phase_count, row.seg_start = ANSWER, True, 0, row.length
        else:
            row.stop_reason = ("forced_answer" if row.phase == ANSWER else
                               "max_new_tokens" if row.gen >= s.max_new_tokens else "max_context")
            row.phase = DONE


def _on_token(row, s, eos, tag):
    """Transition after the row sampled a token (counters already updated). tag: the close tag it completed, or None."""
    if eos:
        row.stop_reason = "forced_answer" if row.phase == ANSWER else "eos"
        row.phase = DONE
        return
    kind, name = s.tags[tag] if tag else (None, None)
    if kind == "action":
        row.num_actions[name] = row.num_actions.get(name, 0) + 1
        row.action = name  # paused until the environment answers
        return
    if kind == "think":
        row.thought_closed = True
    elif kind == "result":
        _queue(row, s.tokenizer.encode("\n", add_special_tokens=False), 0, 1)
        row.phase, row.phase_count, row.seg_start = GEN, 0, row.length
    _settle(row, s)


def _action_argument(text, name):
    """The argument of the action that `text` (the current segment) ends with: between the last <begin_NAME> and the
    last </end_NAME>. No open tag -> "" (the registry answers with an error observation)."""
    end = text.rfind(action_close(name))
    start = text.rfind(action_open(name), 0, end)
    return text[start + len(action_open(name)):end].strip() if start >= 0 else ""


def _environment(rows, segment_texts, tools, s):
    """Answer every paused row's action: ONE batched tool call for the real ones. Queues the observation ids; an
    observation longer than the row's context budget is cut to it (_settle then forces the answer)."""
    def observe(row, name, text):
        room = _limits(row, s)[1] - row.length
        _queue(row, encode_observation(s.tokenizer, format_observation(name, text))[:max(room, 0)], 0, 1)
        row.obs_names.append(name)

    calls = []
    for row, text in zip(rows, segment_texts):
        name, row.action = row.action, None
        if sum(row.num_actions.values()) > s.max_actions:
            observe(row, name, LIMIT_MESSAGE)
        elif s.env == "none":
            observe(row, name, TOOLS_DISABLED)
        elif s.env == "sim":  # the policy writes the observation text itself, after the forced open tag (the
            # reserve always has room for it)
            _queue(row, s.tokenizer.encode(f"\n{result_open(name)}\n", add_special_tokens=False), 0, 1)
            row.phase, row.sim_name, row.phase_count, row.sim_obs = SIM, name, 0, row.sim_obs + 1
            row.obs_names.append(name)
        else:
            calls.append((row, name, _action_argument(text, name)))
    observations = tools([(name, arg) for _, name, arg in calls]) if calls else []
    for (row, name, _), text in zip(calls, observations):
        row.real_calls += 1
        observe(row, name, text)
    for row in rows:
        row.seg_start = row.length
        _settle(row, s)


def _generators(seed, batch, device):
    """seed: None, one int (one generator for the whole batch: the fast path) or one int per prompt (each row draws from
    its own generator only when it samples, so its trajectory does not depend on which rows share its batch)."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    if len(seed) != batch:
        raise ValueError(f"seed has {len(seed)} entries for {batch} prompts (give one int, or one per prompt)")
    return [torch.Generator(device=device).manual_seed(int(x)) for x in seed]


def _sample(logits, temperature, top_p, greedy, generator):
    """logits (B, V) -> token (B,), logprob (B,) of the token under the distribution it was drawn from: softmax(z / T),
    renormalised over the top-p nucleus when top_p < 1 (the RL trainer scores softmax(z / T) and, with --tis-cap,
    corrects the difference with these). generator: None, one generator, or a list with one per row (None: that row
    takes the argmax and draws nothing)."""
    logp = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)  # (B, V)
    if greedy:
        token = logp.argmax(-1)
    else:
        probs = logp.exp()
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix with mass >= top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            logp = torch.log(probs / probs.sum(-1, keepdim=True))  # -inf outside the nucleus: never drawn
        if isinstance(generator, list):
            token = probs.argmax(-1)
            for b, g in enumerate(generator):
                if g is not None:
                    token[b] = torch.multinomial(probs[b], 1, generator=g)[0]
        else:
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def policy_text(tokenizer, ids, obs_mask, obs_names):
    """The text the policy wrote: ids decoded with each observation span (a run of obs_mask 1) replaced by the empty
    result block of its tool, format_observation(name, ""). Tool output (or, in env="sim", the policy's own simulated
    observation) can then never supply the answer, a </think> or a tag; a result tag the policy wrote itself stays
    visible, and evaluate.format_ok rejects it (a fabricated observation)."""
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    parts, start, names = [], 0, iter(obs_names)
    for i in range(len(ids) + 1):
        boundary = i == len(ids) or (i > 0 and obs_mask[i] != obs_mask[i - 1])
        if boundary and i > start:
            parts.append(format_observation(next(names, "search"), "") if obs_mask[start] else decode(ids[start:i]))
            start = i
    return "".join(parts)


def _result(tokenizer, prompt, row, ids, loss, obs, logp):
    n = len(ids) - 1 if ids and ids[-1] == tokenizer.eos_token_id and row.stop_reason in ("eos", "forced_answer") \
        else len(ids)
    return Rollout(list(prompt), ids, loss, obs, logp,
                   tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False),
                   policy_text(tokenizer, ids[:n], obs[:n], row.obs_names),
                   dict(row.num_actions), row.real_calls, row.sim_obs, row.stop_reason)


def _rows(prompts, s):
    rows = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        row = _Row(len(prompt))
        if _limits(row, s)[1] <= 0:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: no room left under max_context={s.max_context} "
                             f"(which keeps {s.reserve} tokens for the forced answer)")
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# What the engine needs from a model (module docstring), checked once per rollout()

FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep")
MASK_FORMS = {"eager": "additive", "sdpa": "boolean", None: "boolean"}  # attention implementation -> 4-D mask form


def _attention(model):
    """The model's attention implementation, which decides the mask form. transformers (4.56 to 5.24) has a public
    setter, model.set_attn_implementation(), but no public getter: this is the one place that reads the private field.
    """
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def check_model(model):
    """Raise a ValueError that names everything `model` lacks to be run by the engine (see the module docstring)."""
    missing = []
    if not isinstance(model, torch.nn.Module) or next(model.parameters(), None) is None:
        missing.append("a torch.nn.Module with parameters (the engine runs on their device)")
    embeddings = getattr(model, "get_output_embeddings", lambda: None)()
    if getattr(embeddings, "weight", None) is None:
        missing.append("get_output_embeddings() returning the output layer (its rows are the vocabulary)")
    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        params = None
    if params is None:
        missing.append("a forward() with an inspectable signature")
    elif not any(p.kind == p.VAR_KEYWORD for p in params.values()):  # **kwargs may pass everything on (a wrapper)
        absent = [a for a in FORWARD_ARGS if a not in params]
        absent += [] if "cache" in params or "past_key_values" in params else ["cache (or past_key_values)"]
        if absent:
            missing.append(f"forward() arguments {', '.join(absent)}")
    if _attention(model) not in MASK_FORMS:
        missing.append(f"an attention implementation that takes a 4-D mask, 'eager' or 'sdpa' (this one is "
                       f"{_attention(model)!r}: load it with attn_implementation='sdpa' or call "
                       f"model.set_attn_implementation('sdpa'))")
    if missing:
        raise ValueError(f"{type(model).__name__} cannot be run by the rollout engine; it needs "
                         + "; ".join(missing))


# -----------------------------------------------------------------------------
# The engine: continuous batching over one KV cache with a slot per token of each row, stops exactly at actions

class _SlotCache(Cache):
    """KV cache where each row writes its new tokens into its OWN next free slots (not one shared column per forward),
    so a forward may cover a subset of the rows, and a row that feeds nothing costs no slot. Buffers are preallocated
    and doubled when full (no torch.cat per step). A finished row is retired: the last live row moves into its buffer
    row, so the live rows stay the first buffer rows and a forward over them reads the buffers as a view (no gathered
    copy) and spends no attention on finished rows. The engine calls prepare() before each forward; the model calls
    update() per layer (the only Cache method a Llama-style model needs given position_ids and a ready 4-D mask).
    A transformers Cache subclass (transformers 5 deprecates other objects); its base class's per-layer storage is
    unused. `kwarg` is the forward() argument it goes in: "cache" (transformers >= 5.x) or "past_key_values"."""

    def __init__(self, batch, device, model=None):
        try:
            super().__init__(layers=[])
        except TypeError:  # base-class signatures differ across transformers versions; nothing of it is used
            pass
        params = inspect.signature(model.forward).parameters if model is not None else {}
        new_name = "cache" in params or ("past_key_values" not in params and _TRANSFORMERS_MAJOR >= 5)  # a wrapper's
        self.kwarg = "cache" if new_name else "past_key_values"                                       # **kwargs
        self.keys, self.values = [], []  # per layer: (B, H, capacity, D), indexed by buffer row
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # slots holding a real token
        self.free = [0] * batch          # next free slot per buffer row (host: sizes are known without a sync)
        self.where = list(range(batch))  # engine row -> buffer row
        self.order = list(range(batch))  # buffer row -> engine row; the first `live` are not retired
        self.live = batch
        self.arange = torch.arange(batch, device=device)
        self.index = self.slots = None
        self.count = self.length = 0
        self.additive = MASK_FORMS.get(_attention(model)) == "additive"  # the mask form (check_model)

    def live_rows(self):
        """Engine rows not retired, in buffer order (a forward over them in this order reads a view)."""
        return self.order[:self.live]

    def retire(self, row):
        """Engine row `row` will never feed again: move the last live row into its buffer row."""
        a, b = self.where[row], self.live - 1
        self.live -= 1
        if a != b:
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[a] = buffer[b]
            self.valid[a] = self.valid[b]
            self.free[a] = self.free[b]
            moved = self.order[b]
            self.order[a], self.where[moved] = moved, a
        self.where[row] = None

    def prepare(self, n, width, rows):
        """Next forward: engine rows `rows` (list), inputs (len(rows), width) right-aligned, the last n[r] of row r real
        (n: list). -> 4-D attention mask."""
        device = self.valid.device
        buffer_rows = [self.where[i] for i in rows]
        self.count = len(buffer_rows)
        # buffer rows 0..R-1 in order (the live rows): read as a view; any other subset: a gathered copy
        prefix = buffer_rows == list(range(self.count))
        index = self.arange[:self.count] if prefix else torch.tensor(buffer_rows, device=device)
        self.index = None if prefix else index
        free = [self.free[i] for i in buffer_rows]
        need = max(free) + width
        if need > self.valid.shape[1]:
            grow = max(need, 2 * self.valid.shape[1]) - self.valid.shape[1]
            self.valid = torch.cat([self.valid, self.valid.new_zeros(len(self.free), grow)], 1)
            for buffers in (self.keys, self.values):
                for i, b in enumerate(buffers):
                    buffers[i] = torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], grow, b.shape[3])], 2)
        n_t = torch.tensor(n, device=device)
        j = torch.arange(width, device=device)
        offset = j - (width - n_t)[:, None]  # (R, width): index within the row's real tokens, < 0 on padding
        # real tokens go to the row's next free slots; padding right after them (never valid, overwritten later)
        self.slots = torch.tensor(free, device=device)[:, None] + torch.where(offset >= 0, offset, n_t[:, None] + j)
        self.valid[index[:, None], self.slots] |= offset >= 0
        for i, k in zip(buffer_rows, n):
            self.free[i] += k
        self.length = max(self.free[i] for i in buffer_rows)
        span = torch.arange(self.length, device=device)
        # query (r, j) sees its row's valid slots up to its own (a padding query sees the whole row: never empty)
        mask = (self.valid[index, None, :self.length] & (span <= self.slots[:, :, None]))[:, None]  # (R, 1, width, L)
        if self.additive:  # the eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
        return mask

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):  # first forward: allocate this layer at the current capacity
            _, H, _, D = key.shape
            self.keys.append(key.new_zeros(len(self.free), H, self.valid.shape[1], D))
            self.values.append(value.new_zeros(len(self.free), H, self.valid.shape[1], D))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.index is None:
            keys, values = keys[:self.count], values[:self.count]
        rows = (self.arange[:self.count] if self.index is None else self.index)[:, None]
        keys[rows, :, self.slots] = key.transpose(1, 2).to(keys.dtype)
        values[rows, :, self.slots] = value.transpose(1, 2).to(values.dtype)
        if self.index is None:
            return keys[:, :, :self.length], values[:, :, :self.length]
        return keys[self.index, :, :self.length], values[self.index, :, :self.length]  # a copy of the few rows


def _forward(model, ids, n, position_ids, cache, rows):
    """One cached forward of right-aligned inputs (the last n[r] slots of row r real) for engine rows `rows` (list) ->
    next-token logits (R, V) at the last slot of each row (meaningful where n > 0)."""
    mask = cache.prepare(n, ids.shape[1], rows)
    # no autocast here: the caller's (train_rl --bf16, evaluate --dtype) applies, so the engine samples from exactly
    # the numerics it was asked for
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                **{cache.kwarg: cache})
    return out.logits[:, -1].float()


def _right_aligned(seqs, pad):
    """Token lists -> (len(seqs), longest) long tensor, each list at the right end, pad on the left."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, width - len(x):] = torch.tensor(x)
    return ids


@dataclass
class _Events:
    """The one device->host copy of a step, one list entry per row (all rows: the copy is one tensor)."""
    event: list        # 1: the row has something for the host (eos, a close tag or a candidate one, a budget)
    eos: list          # 1: it sampled eos
    tag: list          # index in _Batch.single of the one-token close tag it sampled and watches, else -1
    gen: list          # the row's token counters after this step (_Row.gen, .length, .phase_count)
    length: list
    phase_count: list
    token: list        # the token it sampled


class _Batch:
    """The engine's state for one rollout() call: the host rows (_Row, the state machine) and their device mirror
    (response buffers, counters, budgets, watched tags), the KV cache, and the steps of the loop as methods."""

    def __init__(self, model, tokenizer, prompts, rows, tools, s, seed):
        self.model, self.tok, self.prompts, self.rows, self.tools, self.s = model, tokenizer, prompts, rows, tools, s
        device = self.device = next(model.parameters()).device
        B = len(prompts)
        self.generator = _generators(seed, B, device)
        self.arange = torch.arange(B, device=device)
        self._tag_lookup(model.get_output_embeddings().weight.shape[0])
        # Budgets and watched tags mirror the host rows (pushed at events only). The response buffers have one spare
        # last column where rows that do not sample this step write (cheaper than a masked write).
        self.prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        self.cap = cap = s.max_context - min(len(p) for p in prompts) + 1
        self.resp_ids = torch.full((B, cap + 1), tokenizer.pad_token_id, dtype=torch.long, device=device)
        self.resp_loss = torch.zeros(B, cap + 1, dtype=torch.long, device=device)
        self.resp_obs = torch.zeros(B, cap + 1, dtype=torch.long, device=device)
        self.resp_logp = torch.zeros(B, cap + 1, dtype=torch.float, device=device)
        self.counters = torch.zeros(3, B, dtype=torch.long, device=device)  # gen, length, phase_count
        self.limits = torch.zeros(3, B, dtype=torch.long, device=device)    # their budgets (_limits)
        self.watch = torch.zeros(B, max(len(self.single), 1), dtype=torch.bool, device=device)
        self.text_watch = torch.zeros(B, dtype=torch.bool, device=device)
        self.sample_loss = torch.zeros(B, dtype=torch.long, device=device)  # masks of the token it samples next
        self.sample_obs = torch.zeros(B, dtype=torch.long, device=device)
        self.running = torch.zeros(B, dtype=torch.bool, device=device)
        self.is_running = [False] * B  # host copy of `running` (no sync to know whether anyone samples)

    def _tag_lookup(self, V):
        """Close tags that are one token are matched by id on the device (tag_of_token); the rest by decoding the tail
        of the segment, only for rows whose new token contains a tag's last character (could_end)."""
        self.single, self.text_tags = [], []  # [(tag, its id)], [tag]
        for tag in self.s.tags:
            ids = self.tok.encode(tag, add_special_tokens=False)
            (self.single if len(ids) == 1 else self.text_tags).append((tag, ids[0]) if len(ids) == 1 else tag)
        tag_of_token = torch.full((V,), -1, dtype=torch.long)
        for i, (_, token_id) in enumerate(self.single):
            tag_of_token[token_id] = i
        could_end = torch.zeros(V, dtype=torch.bool)
        if self.text_tags:
            last_chars = {t[-1] for t in self.text_tags}
            pieces = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
            could_end[:len(pieces)] = torch.tensor([any(c in (p or "") for c in last_chars) for p in pieces])
        self.tag_of_token, self.could_end = tag_of_token.to(self.device), could_end.to(self.device)
        self.tail = max((len(t) for t in self.text_tags), default=0) + 1

    def push(self, indices):
        """Copy the host state of rows `indices` to the device (one small copy per tensor)."""
        if not indices:
            return
        s, device, idx = self.s, self.device, torch.tensor(indices, device=self.device)
        r = [self.rows[i] for i in indices]
        self.counters[:, idx] = torch.tensor([[x.gen for x in r], [x.length for x in r], [x.phase_count for x in r]],
                                             device=device)
        self.limits[:, idx] = torch.tensor(list(zip(*[_limits(x, s) for x in r])), device=device)
        w = [set(_watched(x, s)) for x in r]
        self.watch[idx] = torch.tensor([[tag in wi for tag, _ in self.single] or [False] for wi in w], device=device)
        self.text_watch[idx] = torch.tensor([any(t in wi for t in self.text_tags) for wi in w], device=device)
        self.sample_loss[idx] = torch.tensor([int(x.phase != SIM or s.train_sim_obs) for x in r], device=device)
        self.sample_obs[idx] = torch.tensor([int(x.phase == SIM) for x in r], device=device)
        for i, x in zip(indices, r):
            self.is_running[i] = x.phase != DONE and x.action is None and not x.inject
        self.running[idx] = torch.tensor([self.is_running[i] for i in indices], device=device)

    def prefill(self):
        """Prefill the left-padded prompts into a new cache; positions count real tokens only, so padding changes
        nothing. -> next-token logits (B, V)."""
        ids = _right_aligned(self.prompts, self.tok.pad_token_id).to(self.device)
        width = ids.shape[1]
        self.cache = _SlotCache(len(self.prompts), self.device, self.model)
        position = (torch.arange(width, device=self.device) - (width - self.prompt_len)[:, None]).clamp(min=0)
        self.next_logits = _forward(self.model, ids, [len(p) for p in self.prompts], position, self.cache,
                                    list(range(len(self.prompts))))
        self.push(list(range(len(self.prompts))))

    def sample_and_record(self, temperature, top_p, greedy):
        """Step 1: sample one token per row from next_logits and write it to the response buffers (rows that do not
        sample write to the spare column and draw nothing from their own generator). -> token (B,)"""
        generator = ([g if r else None for g, r in zip(self.generator, self.is_running)]
                     if isinstance(self.generator, list) else self.generator)
        token, logp = _sample(self.next_logits, temperature, top_p, greedy, generator)
        at = torch.where(self.running, self.counters[1].clamp(max=self.cap - 1), self.cap)
        self.resp_ids[self.arange, at] = token
        self.resp_loss[self.arange, at] = self.sample_loss
        self.resp_obs[self.arange, at] = self.sample_obs
        self.resp_logp[self.arange, at] = logp
        self.counters += self.running.long()
        return token

    def stop_checks(self, token):
        """Step 2: on the device, which rows have an event: eos, a watched one-token close tag, a token that may
        complete a text tag, a budget reached. -> _Events: the ONE device->host sync of the step."""
        eos = token == self.tok.eos_token_id
        tag = self.tag_of_token[token]
        tag_hit = (tag >= 0) & self.watch.gather(1, tag.clamp(min=0)[:, None])[:, 0]
        out = (self.counters >= self.limits).any(0)
        event = self.running & (eos | tag_hit | (self.could_end[token] & self.text_watch) | out)
        return _Events(*torch.stack([event.long(), eos.long(), torch.where(tag_hit, tag, -1), *self.counters,
                                     token]).tolist())

    def on_events(self, ev):
        """Step 3: the state machine (_on_token) for the rows with an event, on the host. -> those rows."""
        touched = [i for i, e in enumerate(ev.event) if e]
        for i in touched:
            row = self.rows[i]
            row.gen, row.length, row.phase_count = ev.gen[i], ev.length[i], ev.phase_count[i]
            hit = self.single[ev.tag[i]][0] if ev.tag[i] >= 0 else None
            if hit is None and self.text_tags and not ev.eos[i]:
                start = max(row.seg_start, row.length - self.tail)
                hit = _completed_tag(self.tok, self.resp_ids[i, start:row.length].tolist(), _watched(row, self.s))
            _on_token(row, self.s, bool(ev.eos[i]), hit)
        return touched

    def call_tools(self, touched):
        """Step 4: the rows that paused on an action THIS step get one batched tool call now; nobody waits."""
        paused = [i for i in touched if self.rows[i].action is not None]
        if paused:
            texts = [self.tok.decode(self.resp_ids[i, self.rows[i].seg_start:self.rows[i].length].tolist(),
                                     skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in paused]
            _environment([self.rows[i] for i in paused], texts, self.tools, self.s)

    def queue_injections(self, touched, tokens):
        """Step 5: injected ids (observation, forced tags) go to the response buffers now (one write per tensor).
        -> {row: (response index of its sampled token, [that token] + the injected ids)}: the chunks to feed."""
        chunks, cells = {}, []
        for i in touched:
            row = self.rows[i]
            if row.inject:
                queued = [(t, loss, obs) for ids, loss, obs in row.inject for t in ids]
                start = row.length - len(queued)
                cells += [(i, start + j, *c) for j, c in enumerate(queued)]
                chunks[i] = (start - 1, [tokens[i]] + [t for t, _, _ in queued])
                row.inject = []
        if cells:
            r, c, t, loss, obs = (torch.tensor(x, device=self.device) for x in zip(*cells))
            self.resp_ids[r, c], self.resp_loss[r, c], self.resp_obs[r, c] = t, loss, obs
        return chunks

    def feed_cache(self, token, chunks):
        """Step 6: update next_logits. Decoding rows feed their token, in a forward over the live (not retired) rows
        (rows that ended this step or inject feed nothing). Injecting rows feed their chunks, right-aligned so the last
        slot is real, in a second forward over those rows only. One forward of width max(chunk) over all B rows would
        cost B x that width in padding: on the tiny CPU bench (batch 32) it processed 3x the tokens and ran ~2x slower
        than two forwards."""
        live = self.cache.live_rows()
        n = [int(self.is_running[i] and i not in chunks and self.rows[i].phase != DONE) for i in live]
        if any(n):
            idx = torch.tensor(live, device=self.device)
            position = (self.prompt_len + self.counters[1] - 1)[idx, None]
            logits = _forward(self.model, token[idx, None], n, position, self.cache, live)
            fed = torch.tensor(n, device=self.device).bool()[:, None]
            self.next_logits[idx] = torch.where(fed, logits, self.next_logits[idx])
        if chunks:
            ids = _right_aligned([chunk for _, chunk in chunks.values()], self.tok.pad_token_id).to(self.device)
            width = ids.shape[1]
            idx = torch.tensor(list(chunks), device=self.device)
            first = torch.tensor([f for f, _ in chunks.values()], device=self.device)
            n_c = [len(c) for _, c in chunks.values()]
            position = (self.prompt_len[idx] + first)[:, None] + torch.arange(width, device=self.device) \
                - (width - torch.tensor(n_c, device=self.device))[:, None]
            self.next_logits[idx] = _forward(self.model, ids, n_c, position.clamp(min=0), self.cache, list(chunks))

    def retire_and_push(self, touched):
        """Step 7: finished rows leave the cache (later forwards skip them); the touched rows' state goes back to the
        device."""
        for i in touched:
            if self.rows[i].phase == DONE:
                self.cache.retire(i)
        self.push(touched)

    def results(self):
        lengths = [r.length for r in self.rows]
        ids, loss, obs, logp = (t.tolist() for t in (self.resp_ids, self.resp_loss, self.resp_obs, self.resp_logp))
        return [_result(self.tok, self.prompts[i], self.rows[i], ids[i][:n], loss[i][:n], obs[i][:n], logp[i][:n])
                for i, n in enumerate(lengths)]


@torch.inference_mode()  # not no_grad: no autograd version counting on each small op (~2% on the tiny CPU bench)
def rollout(model, tokenizer, prompts, tools, env="real", *, max_new_tokens=512, max_actions=10, max_context=2048,
            answer_tokens=32, temperature=1.0, top_p=1.0, greedy=False, seed=None, train_sim_obs=False,
            progress=False, sim_obs_tokens=256):
    """Generate one trajectory per prompt (list of token ids). tools: a ToolRegistry ((name, arg) list -> texts).
    env: "real" calls the tools, "sim" lets the policy write the observations, "none" answers "tools are disabled".
    seed: an int, or one int per prompt (per-row generators). -> list[Rollout], in prompt order. See the module
    docstring for the rules and for what the model must support (check_model)."""
    check_model(model)
    s = _setup(tokenizer, tools, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
               train_sim_obs)
    rows = _rows(prompts, s)
    was_training = model.training
    model.eval()
    batch = _Batch(model, tokenizer, prompts, rows, tools, s, seed)
    batch.prefill()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_new_tokens, desc="rollout", unit="tok")
    while any(batch.is_running):
        token = batch.sample_and_record(temperature, top_p, greedy)  # 1. one token per running row, recorded
        events = batch.stop_checks(token)                             # 2. eos / tags / budgets; the one sync
        if bar is not None:
            bar.update(1)
        touched = batch.on_events(events)                             # 3. the state machine, rows with an event
        batch.call_tools(touched)                                     # 4. one tool call for the rows that paused
        chunks = batch.queue_injections(touched, events.token)        # 5. observations and forced tags queued
        batch.feed_cache(token, chunks)                               # 6. decode forward + injection forward
        batch.retire_and_push(touched)                                # 7. finished rows leave; state to device
    if bar is not None:
        bar.close()
    model.train(was_training)
    return batch.results()


# -----------------------------------------------------------------------------
# The oracle: same state machine, no cache, one row at a time, a full forward per token

@torch.no_grad()
def naive_rollout(model, tokenizer, prompts, tools, env="real", *, max_new_tokens=512, max_actions=10,
                  max_context=2048, answer_tokens=32, temperature=1.0, top_p=1.0, greedy=False, seed=None,
                  train_sim_obs=False, progress=False, sim_obs_tokens=256):
    """Reference for rollout(): same arguments and semantics, written for obviousness, not speed. Tags are always found
    by decoding (never by id), so it also checks the engine's one-token fast path."""
    s = _setup(tokenizer, tools, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
               train_sim_obs)
    rows = _rows(prompts, s)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generators = _generators(seed, len(prompts), device)
    tail = max(len(t) for t in s.tags) + 1
    results = []
    for b, (prompt, row) in enumerate(zip(prompts, rows)):
        generator = generators[b] if isinstance(generators, list) else generators
        ids, loss, obs, logp = [], [], [], []
        while row.phase != DONE:
            if row.action is not None:
                text = tokenizer.decode(ids[row.seg_start:], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
                _environment([row], [text], tools, s)
            for chunk_ids, chunk_loss, chunk_obs in row.inject:
                ids += chunk_ids
                loss += [chunk_loss] * len(chunk_ids)
                obs += [chunk_obs] * len(chunk_ids)
                logp += [0.0] * len(chunk_ids)
            row.inject = []
            if row.phase == DONE:
                break
            logits = model(torch.tensor([prompt + ids], device=device)).logits[:, -1].float()
            token, token_logp = _sample(logits, temperature, top_p, greedy, generator)
            ids.append(int(token))
            loss.append(int(row.phase != SIM or train_sim_obs))
            obs.append(int(row.phase == SIM))
            logp.append(float(token_logp))
            row.gen, row.length, row.phase_count = row.gen + 1, row.length + 1, row.phase_count + 1
            is_eos = ids[-1] == tokenizer.eos_token_id
            tag = None if is_eos else _completed_tag(tokenizer, ids[max(row.seg_start, len(ids) - tail):],
                                                     _watched(row, s))
            _on_token(row, s, is_eos, tag)
        results.append(_result(tokenizer, prompt, row, ids, loss, obs, logp))
    model.train(was_training)
    return results
