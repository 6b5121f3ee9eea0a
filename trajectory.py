"""
The per-row rules of the agent rollout (paper 2.1, Algorithm 1), as a state machine over one row. engine.py runs them
batched, its test oracle (tests/oracle.py) one row at a time: the oracle checks the batching, not a copy of the rules.

The rules, where they depart from the paper / the original code, and why:
- Forced answer at the budget (paper Algorithm 1, lines 24-27): `answer_tokens` (plus the few tokens of the forced tags)
  are reserved inside max_new_tokens / max_context; when a row still thinking runs out, "</think>\\n" is appended
  (loss_mask 0) and it writes at most answer_tokens more. A row that closed </think> itself may use the reserve.
- seed may be one int per prompt: each row then draws from its own generator (only when it samples), so its trajectory
  does not depend on the other rows of the batch (N-process RL == 1-process RL).
- env="sim" (RL stage 1): the policy writes the observation itself after "\\n<NAME_result>\\n" until it writes
  </NAME_result> (at most sim_obs_tokens, then the close is forced); those tokens are obs (loss_mask 0 unless
  train_sim_obs) and no tool is called.
- observe=NAME (the world models, common.simulate): each prompt already ends inside an opened <NAME_result> tag; the
  row writes that one observation and is done at its close, eos or sim_obs_tokens: the same loop, no HF generate.
"""
from dataclasses import dataclass, field

import torch

from model import TOOLS_DISABLED, encode_observation
from tools import (LIMIT_MESSAGE, THINK_CLOSE, TOOL_NAMES, action_close, action_open, format_observation, result_close,
                   result_open)

# -----------------------------------------------------------------------------
# Results, per-row state and the state machine shared by the engine and the oracle

@dataclass
class Rollout:
    prompt_ids: list
    response_ids: list
    loss_mask: list        # 1 = the policy sampled it and it is trained on (SPEC 3)
    obs_mask: list         # 1 = observation (real, disabled/limit text, or simulated by the policy)
    logprobs: list         # log-prob under the distribution it was sampled from (_sample); 0.0 where injected
    text: str              # decoded response (special tokens kept: the tags may be special tokens)
    policy_text: str       # the response as the POLICY wrote it, observations emptied (policy_text())
    num_actions: dict      # tool name -> actions the row emitted (past max_actions too)
    real_calls: int        # tool requests this row sent to the ToolRegistry (its cache may still answer some)
    sim_obs: int           # observations the policy wrote itself (env="sim")
    stop_reason: str       # "eos" | "max_new_tokens" | "max_context" | "forced_answer"


# row phases: thinking/acting, writing a sim observation, writing the forced answer, finished
GEN, SIM, ANSWER, DONE = "gen", "sim", "answer", "done"


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
    sim_real: tuple         # env="sim": tools called for real all the same (free and exact ones: the calculator)
    sim_greedy: bool        # env="sim": the simulated observations are the argmax (the policy's own tokens sampled)
    observe: str            # a tool name: every row writes only that tool's observation (module docstring)
    tags: dict              # close tag text -> ("action"|"result"|"think", tool name)
    think_ids: list         # "</think>\n", the forced-answer switch
    reserve: int            # context tokens kept free for the forced tags + answer


def _setup(tokenizer, tools, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
           train_sim_obs, sim_real=(), sim_greedy=False, observe=""):
    if env not in ("real", "sim", "none"):
        raise ValueError(f"env must be 'real', 'sim' or 'none', got {env!r}")
    if observe and env != "sim":
        raise ValueError(f"observe={observe!r} writes simulated observations: it needs env='sim', got {env!r}")
    if sim_greedy and train_sim_obs:
        raise ValueError("sim_greedy with train_sim_obs: trained observation tokens must be sampled from the policy")
    if (env == "real" or env == "sim" and sim_real) and tools is None:
        raise ValueError(f"env={env!r} needs tools (a ToolRegistry)" + (" for sim_real" if env == "sim" else ""))
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    if answer_tokens >= max_new_tokens:
        raise ValueError(f"answer_tokens ({answer_tokens}) must be < max_new_tokens ({max_new_tokens})")
    names = list(dict.fromkeys([*TOOL_NAMES, *getattr(tools, "names", ())]))
    tags = {THINK_CLOSE: ("think", None)}
    for name in names:
        tags.update({action_close(name): ("action", name), result_close(name): ("result", name)})
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    think_ids = enc(THINK_CLOSE + "\n")
    sim_tags = max(len(enc(f"\n{result_open(n)}\n")) + len(enc(result_close(n) + "\n")) for n in names)
    return _Setup(tokenizer, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
                  train_sim_obs, tuple(sim_real), sim_greedy, observe, tags, think_ids,
                  answer_tokens + len(think_ids) + sim_tags)


def _limits(row, s):
    """-> (max sampled tokens, max response length, max tokens in this phase) for the row's current phase."""
    big = 1 << 30
    if row.phase == ANSWER or row.phase == GEN and row.thought_closed:  # answering: the reserve is its to use
        return s.max_new_tokens, s.max_context - row.prompt_len, s.answer_tokens if row.phase == ANSWER else big
    cap = s.sim_obs_tokens if row.phase == SIM else big
    return s.max_new_tokens - s.answer_tokens, s.max_context - s.reserve - row.prompt_len, cap


def _watched(row, s):
    """Close tags that end something for this row now."""
    if row.phase == GEN:
        return [t for t, (kind, _) in s.tags.items() if kind == "action" or kind == "think" and not row.thought_closed]
    return [result_close(row.sim_name)] if row.phase == SIM else []


def _completed_tag(tokenizer, tail_ids, tags):
    """The tag in `tags` the LAST token of tail_ids completes, else None (tail_ids: more tokens than tag characters)."""
    text = tokenizer.decode(tail_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    before = tokenizer.decode(tail_ids[:-1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return next((t for t in tags if t in text and t not in before), None)


def _queue(row, ids, loss, obs):
    row.inject.append((list(ids), loss, obs))
    row.length += len(ids)


def _settle(row, s):
    """While a budget (_limits) is spent: close a sim observation, force the answer (Algorithm 1, 24-27), or stop."""
    while row.phase != DONE and any(count >= limit for count, limit in
                                    zip((row.gen, row.length, row.phase_count), _limits(row, s))):
        if row.phase == SIM and s.observe:
            row.phase, row.stop_reason = DONE, "max_obs_tokens"
        elif row.phase == SIM:
            _queue(row, s.tokenizer.encode(result_close(row.sim_name) + "\n", add_special_tokens=False), 0, 1)
            row.phase, row.phase_count, row.seg_start = GEN, 0, row.length
        elif row.phase == GEN and not row.thought_closed:
            _queue(row, s.think_ids, 0, 0)
            row.phase, row.thought_closed, row.phase_count, row.seg_start = ANSWER, True, 0, row.length
        else:
            row.phase, row.stop_reason = DONE, ("forced_answer" if row.phase == ANSWER else
                                                "max_new_tokens" if row.gen >= s.max_new_tokens else "max_context")


def _on_token(row, s, eos, tag):
    """Transition after the row sampled a token (counters already updated). tag: the close tag it completed, or None."""
    if eos:
        row.phase, row.stop_reason = DONE, "forced_answer" if row.phase == ANSWER else "eos"
        return
    kind, name = s.tags[tag] if tag else (None, None)
    if kind == "action":
        row.num_actions[name] = row.num_actions.get(name, 0) + 1
        row.action = name  # paused until the environment answers
        return
    if kind == "think":
        row.thought_closed = True
    elif kind == "result" and s.observe:
        row.phase, row.stop_reason = DONE, "observed"
        return
    elif kind == "result":
        _queue(row, s.tokenizer.encode("\n", add_special_tokens=False), 0, 1)
        row.phase, row.phase_count, row.seg_start = GEN, 0, row.length
    _settle(row, s)


def _action_argument(text, name):
    """Between the last <begin_NAME> and </end_NAME> of `text` (the segment); no open tag: "" (an error observation)."""
    end = text.rfind(action_close(name))
    start = text.rfind(action_open(name), 0, end)
    return text[start + len(action_open(name)):end].strip() if start >= 0 else ""


def _environment(rows, segment_texts, tools, s):
    """Answer the paused rows' actions, ONE tool call for the real ones; an observation past the budget is cut."""
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
        elif s.env == "sim" and name not in s.sim_real:  # the policy writes it (the reserve fits this open tag)
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
    """seed: None, one int (one generator for the batch: the fast path) or one int per prompt (module docstring)."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    if len(seed) != batch:
        raise ValueError(f"seed has {len(seed)} entries for {batch} prompts (give one int, or one per prompt)")
    return [torch.Generator(device=device).manual_seed(int(x)) for x in seed]


def _sample(logits, temperature, top_p, greedy, generator):
    """logits (B, V) -> token (B,), its logprob (B,) under the distribution it was drawn from: softmax(z / T), over the
    top-p nucleus if top_p < 1 (for --tis-cap). generator: None, one, or one per row (None: argmax, no draw)."""
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
    """The text the policy wrote: each observation span (obs_mask 1) is its tool's empty result block, so no observation
    supplies the answer, a </think> or a tag; a result tag the policy wrote stays visible (format_ok rejects it)."""
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    parts, start, names = [], 0, iter(obs_names)
    for i in range(len(ids) + 1):
        boundary = i == len(ids) or (i > 0 and obs_mask[i] != obs_mask[i - 1])
        if boundary and i > start:
            parts.append(format_observation(next(names, "search"), "") if obs_mask[start] else decode(ids[start:i]))
            start = i
    return "".join(parts)


def _result(tokenizer, prompt, row, ids, loss, obs, logp):
    ended = ids and ids[-1] == tokenizer.eos_token_id and row.stop_reason in ("eos", "forced_answer")
    n = len(ids) - 1 if ended else len(ids)  # the texts leave out the eos
    return Rollout(list(prompt), ids, loss, obs, logp,
                   tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False),
                   policy_text(tokenizer, ids[:n], obs[:n], row.obs_names),
                   dict(row.num_actions), row.real_calls, row.sim_obs, row.stop_reason)


def _rows(prompts, s):
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if _limits(_Row(len(prompt)), s)[1] <= 0:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: no room left under max_context={s.max_context} "
                             f"(which keeps {s.reserve} tokens for the forced answer)")
    return [_Row(len(prompt), phase=SIM if s.observe else GEN, sim_name=s.observe) for prompt in prompts]
