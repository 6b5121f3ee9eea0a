"""
The agent rollout engine (paper 2.1, Algorithm 1): trajectory.py's per-row rules batched over one KV cache, as the
numbered steps of rollout()'s loop (distributed scripts call it on the unwrapped model, on every rank).

    from engine import rollout  # model, tok and prompt as in model.py's docstring
    rollouts = rollout(model, tok, [prompt] * 8, make_tools(corpus="data/corpus.jsonl"), env="real", temperature=0.6)

A model must pass check_model() (a Hugging Face causal LM does: Llama, Qwen2, SmolLM2...), use the given position_ids
and 4-D attention_mask (B, 1, T, L) as they are, and call cache.update(key, value, layer_idx) once per layer. "eager"
attention gets an additive float mask, "sdpa" a boolean one; other kernels misread a 4-D mask and are refused.

How this departs from the original code (verl + vLLM), and why:
- It generated each turn to EOS or 2048 tokens, cut the text at the first action and re-encoded the whole context every
  turn. Here a row stops at the token that completes `</end_NAME>` (zero tokens past it), the prefix is never
  re-encoded, and masks come from token ids, never from re-tokenised text (SPEC 3, as model.encode_segments).
- A close tag of several text tokens is found on the decoded tail of the segment, a one-token tag by id. A BPE token
  that merges the tag's last ">" with more characters (">\\n") stops the row after it: still zero tokens past the tag.
- Tool calls are batched over the rows that paused at the same step (often one), their observations prefilled into the
  cache while the other rows keep decoding: nobody idles, at the price of smaller batches for a retrieval server.
  tool_batch=N makes paused rows wait for N (or for the last running row): the choice for a tool that generates (the
  world models), where one batched generation costs about what one observation does. Rows never see the difference.
"""
import contextlib
import inspect
from collections import namedtuple

import torch
import transformers
from transformers.cache_utils import Cache

# the per-row rules; Rollout and policy_text are re-exported for callers
from trajectory import (DONE, SIM, Rollout, _completed_tag, _environment, _generators, _limits, _on_token,  # noqa: F401
                        _result, _rows, _sample, _setup, _watched, policy_text)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# -----------------------------------------------------------------------------
# What the engine needs from a model (module docstring), checked once per rollout()

FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep")


def _attention(model):
    return getattr(getattr(model, "config", None), "_attn_implementation", None)  # private: no public getter


def check_model(model):
    """Raise a ValueError that names everything `model` lacks to be run by the engine."""
    missing = []
    if not isinstance(model, torch.nn.Module) or next(model.parameters(), None) is None:
        missing.append("a torch.nn.Module with parameters (the engine runs on their device)")
    if getattr(getattr(model, "get_output_embeddings", lambda: None)(), "weight", None) is None:
        missing.append("get_output_embeddings() returning the output layer (its rows are the vocabulary)")
    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        params = None
        missing.append("a forward() with an inspectable signature")
    if params is not None and not any(p.kind == p.VAR_KEYWORD for p in params.values()):  # a wrapper's **kwargs: ok
        absent = [a for a in FORWARD_ARGS if a not in params]
        absent += [] if "cache" in params or "past_key_values" in params else ["cache (or past_key_values)"]
        missing += [f"forward() arguments {', '.join(absent)}"] if absent else []
    if _attention(model) not in ("eager", "sdpa", None):
        missing.append(f"an attention implementation that takes a 4-D mask, 'eager' or 'sdpa' (this one is "
                       f"{_attention(model)!r}: load it with attn_implementation='sdpa' or call "
                       f"model.set_attn_implementation('sdpa'))")
    if missing:
        raise ValueError(f"{type(model).__name__} cannot be run by the rollout engine; it needs " + "; ".join(missing))


# -----------------------------------------------------------------------------
# The engine: continuous batching over one KV cache, stopping exactly at actions

class _SlotCache(Cache):
    """KV cache where each row writes its new tokens into its OWN next free slots, so a forward may cover a subset of
    the rows and a row that feeds nothing costs no slot; the live rows stay the first buffer rows (retire): a view."""

    def __init__(self, batch, device, model=None):
        with contextlib.suppress(TypeError):  # transformers 5 wants a Cache; its storage is unused
            super().__init__(layers=[])
        params = inspect.signature(model.forward).parameters if model is not None else {}
        new_name = "cache" in params or ("past_key_values" not in params and _TRANSFORMERS_MAJOR >= 5)
        self.kwarg = "cache" if new_name else "past_key_values"  # a wrapper's **kwargs: by version
        self.keys, self.values = [], []  # per layer: (B, H, capacity, D), indexed by buffer row
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # slots holding a real token
        self.free = [0] * batch          # next free slot per buffer row (host: sizes are known without a sync)
        self.where = list(range(batch))  # engine row -> buffer row
        self.order = list(range(batch))  # buffer row -> engine row; the first `live` are not retired
        self.live = batch
        self.additive = _attention(model) == "eager"  # the mask form (check_model)

    def retire(self, row):
        """Engine row `row` will never feed again: move the last live row into its buffer row."""
        a, b = self.where[row], self.live - 1
        self.live -= 1
        if a != b:
            for buffer in self.keys + self.values:
                buffer[a] = buffer[b]
            self.valid[a] = self.valid[b]
            self.free[a] = self.free[b]
            moved = self.order[b]
            self.order[a], self.where[moved] = moved, a
        self.where[row] = None

    def prepare(self, n, width, rows):
        """Next forward: engine rows `rows`, inputs (R, width) right-aligned, row r's last n[r] real -> 4-D mask."""
        device = self.valid.device
        buffer_rows = [self.where[i] for i in rows]
        self.count = len(buffer_rows)
        self.view = buffer_rows == list(range(self.count))  # the live rows in order: read as a view, else a copy
        self.index = torch.arange(self.count, device=device) if self.view else torch.tensor(buffer_rows, device=device)
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
        self.valid[self.index[:, None], self.slots] |= offset >= 0
        for i, k in zip(buffer_rows, n):
            self.free[i] += k
        self.length = max(self.free[i] for i in buffer_rows)
        span = torch.arange(self.length, device=device)
        # (R, 1, width, L): query (r, j) sees its row's valid slots up to its own (padding: the whole row, never empty)
        mask = (self.valid[self.index, None, :self.length] & (span <= self.slots[:, :, None]))[:, None]
        if self.additive:  # the eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
        return mask

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):  # first forward: allocate this layer at the current capacity
            _, H, _, D = key.shape
            self.keys.append(key.new_zeros(len(self.free), H, self.valid.shape[1], D))
            self.values.append(value.new_zeros(len(self.free), H, self.valid.shape[1], D))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.index[:, None], :, self.slots] = key.transpose(1, 2).to(keys.dtype)
        values[self.index[:, None], :, self.slots] = value.transpose(1, 2).to(values.dtype)
        if self.view:
            return keys[:self.count, :, :self.length], values[:self.count, :, :self.length]
        return keys[self.index, :, :self.length], values[self.index, :, :self.length]  # a copy of the few rows


def _forward(model, ids, n, position_ids, cache, rows):
    mask = cache.prepare(n, ids.shape[1], rows)  # no autocast of its own: the caller's (train_rl --bf16) applies
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                **{cache.kwarg: cache})
    return out.logits[:, -1].float()  # (R, V) next-token logits, meaningful where n > 0


# The one device->host copy of a step, a list per field (tag: the index in _Batch.single of a watched tag, else -1)
_Events = namedtuple("_Events", "event eos tag gen length phase_count token")


class _Batch:
    """One rollout() call: host rows (_Row), their device mirror, the KV cache, and the loop's steps 1-7 as methods."""

    def __init__(self, model, tokenizer, prompts, rows, tools, s, seed):
        self.model, self.tok, self.prompts, self.rows, self.tools, self.s = model, tokenizer, prompts, rows, tools, s
        device = self.device = next(model.parameters()).device
        B, V = len(prompts), model.get_output_embeddings().weight.shape[0]
        self.generator = _generators(seed, B, device)
        self.arange = torch.arange(B, device=device)
        # close tags: one token by id (tag_of_token), longer ones decoded if the new token holds a last character
        ids = {tag: tokenizer.encode(tag, add_special_tokens=False) for tag in s.tags}
        self.single = [(tag, x[0]) for tag, x in ids.items() if len(x) == 1]  # [(tag, its id)]
        self.text_tags = [tag for tag, x in ids.items() if len(x) != 1]
        self.tail = max((len(t) for t in self.text_tags), default=0) + 1
        tag_of_token = torch.full((V,), -1, dtype=torch.long)
        tag_of_token[[token_id for _, token_id in self.single]] = torch.arange(len(self.single))
        could_end = torch.zeros(V, dtype=torch.bool)
        if self.text_tags:
            last_chars = {t[-1] for t in self.text_tags}
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            could_end[:len(pieces)] = torch.tensor([any(c in (p or "") for c in last_chars) for p in pieces])
        self.tag_of_token, self.could_end = tag_of_token.to(device), could_end.to(device)
        # device mirrors of the host rows, pushed at events; rows that do not sample write to a spare last column
        self.prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        self.cap = cap = s.max_context - min(len(p) for p in prompts) + 1
        self.resp_ids = torch.full((B, cap + 1), tokenizer.pad_token_id, dtype=torch.long, device=device)
        self.resp_loss, self.resp_obs = torch.zeros(2, B, cap + 1, dtype=torch.long, device=device)
        self.resp_logp = torch.zeros(B, cap + 1, dtype=torch.float, device=device)
        self.counters = torch.zeros(3, B, dtype=torch.long, device=device)  # gen, length, phase_count
        self.limits = torch.zeros(3, B, dtype=torch.long, device=device)    # their budgets (_limits)
        self.watch = torch.zeros(B, max(len(self.single), 1), dtype=torch.bool, device=device)
        self.text_watch, self.running = torch.zeros(2, B, dtype=torch.bool, device=device)
        self.sample_loss, self.sample_obs = torch.zeros(2, B, dtype=torch.long, device=device)  # its next token's masks
        self.is_running = [False] * B  # host copy of `running` (no sync to know whether anyone samples)
        self.waiting = []  # rows paused at an action, waiting for a batched tool call (call_tools)
        self.cache = _SlotCache(B, device, model)  # prefill the prompts
        self.next_logits = self.feed_chunks(list(range(B)), prompts, [0] * B)
        self.push(list(range(B)))

    def push(self, indices):
        """Copy the host state of rows `indices` to the device (one small copy per tensor)."""
        if not indices:
            return
        s, device, idx = self.s, self.device, torch.tensor(indices, device=self.device)
        r = [self.rows[i] for i in indices]
        self.counters[:, idx] = torch.tensor([(x.gen, x.length, x.phase_count) for x in r], device=device).T
        self.limits[:, idx] = torch.tensor(list(zip(*[_limits(x, s) for x in r])), device=device)
        w = [set(_watched(x, s)) for x in r]
        self.watch[idx] = torch.tensor([[tag in wi for tag, _ in self.single] or [False] for wi in w], device=device)
        self.text_watch[idx] = torch.tensor([any(t in wi for t in self.text_tags) for wi in w], device=device)
        self.sample_loss[idx] = torch.tensor([int(x.phase != SIM or s.train_sim_obs) for x in r], device=device)
        self.sample_obs[idx] = torch.tensor([int(x.phase == SIM) for x in r], device=device)
        for i, x in zip(indices, r):
            self.is_running[i] = x.phase != DONE and x.action is None and not x.inject
        self.running[idx] = torch.tensor([self.is_running[i] for i in indices], device=device)

    def feed_chunks(self, rows, chunks, starts):
        """One forward of token lists `chunks` for engine rows `rows`, left-padded, chunk r from position starts[r]."""
        n = [len(c) for c in chunks]
        width = max(n)
        ids = torch.tensor([[self.tok.pad_token_id] * (width - len(c)) + list(c) for c in chunks])
        position = (torch.tensor(starts) - width + torch.tensor(n))[:, None] + torch.arange(width)
        return _forward(self.model, ids.to(self.device), n, position.clamp(min=0).to(self.device), self.cache, rows)

    def sample_and_record(self, temperature, top_p, greedy):
        """Step 1: sample a token per row into the response buffers (s.sim_greedy: argmax, logp 0 if simulated)."""
        generator = ([g if r else None for g, r in zip(self.generator, self.is_running)]
                     if isinstance(self.generator, list) else self.generator)
        token, logp = _sample(self.next_logits, temperature, top_p, greedy, generator)
        if self.s.sim_greedy:
            sim = self.sample_obs.bool()
            token, logp = torch.where(sim, self.next_logits.argmax(-1), token), logp.masked_fill(sim, 0.0)
        at = torch.where(self.running, self.counters[1].clamp(max=self.cap - 1), self.cap)
        self.resp_ids[self.arange, at] = token
        self.resp_loss[self.arange, at] = self.sample_loss
        self.resp_obs[self.arange, at] = self.sample_obs
        self.resp_logp[self.arange, at] = logp
        self.counters += self.running.long()
        return token

    def stop_checks(self, token):
        eos = token == self.tok.eos_token_id
        tag = self.tag_of_token[token]
        tag_hit = (tag >= 0) & self.watch.gather(1, tag.clamp(min=0)[:, None])[:, 0]
        out = (self.counters >= self.limits).any(0)
        event = self.running & (eos | tag_hit | (self.could_end[token] & self.text_watch) | out)
        return _Events(*torch.stack([event.long(), eos.long(), torch.where(tag_hit, tag, -1), *self.counters,
                                     token]).tolist())

    def on_events(self, ev):
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

    def call_tools(self, touched, tool_batch):
        """Step 4: rows paused at an action wait (not running) until tool_batch of them do or no other row runs; then
        ONE tool call answers them all -> the rows answered that paused at an earlier step (their token is cached)"""
        self.waiting += [i for i in touched if self.rows[i].action is not None]
        if not self.waiting or len(self.waiting) < tool_batch and any(
                r.phase != DONE and r.action is None for r in self.rows):
            return []
        paused, self.waiting = self.waiting, []
        texts = [self.tok.decode(self.resp_ids[i, self.rows[i].seg_start:self.rows[i].length].tolist(),
                                 skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in paused]
        _environment([self.rows[i] for i in paused], texts, self.tools, self.s)
        return [i for i in paused if i not in touched]

    def queue_injections(self, touched, tokens, earlier=()):
        """Step 5: injected ids (observation, forced tags) go to the response buffers now (one write per tensor).
        -> {row: (response index of the chunk's first token, the ids)}: the chunks to feed. A row touched this step
        feeds the token it sampled first; `earlier` rows (answered after waiting) fed theirs when they paused."""
        chunks, cells = {}, []
        for i in [*touched, *earlier]:
            row = self.rows[i]
            if row.inject:
                queued = [(t, loss, obs) for ids, loss, obs in row.inject for t in ids]
                start = row.length - len(queued)
                cells += [(i, start + j, *c) for j, c in enumerate(queued)]
                fresh = i not in earlier
                chunks[i] = (start - fresh, [tokens[i]] * fresh + [t for t, _, _ in queued])
                row.inject = []
        if cells:
            r, c, t, loss, obs = (torch.tensor(x, device=self.device) for x in zip(*cells))
            self.resp_ids[r, c], self.resp_loss[r, c], self.resp_obs[r, c] = t, loss, obs
        return chunks

    def feed_cache(self, token, chunks):
        """Step 6: update next_logits: decoding rows feed their token over the live rows, injecting rows their chunks in
        a second forward over those rows only (one padded forward over all rows: 3x the tokens, ~2x slower on CPU)."""
        live = self.cache.order[:self.cache.live]  # not retired, in buffer order (read as a view)
        n = [int(self.is_running[i] and i not in chunks and self.rows[i].phase != DONE) for i in live]
        if any(n):
            idx = torch.tensor(live, device=self.device)
            position = (self.prompt_len + self.counters[1] - 1)[idx, None]
            logits = _forward(self.model, token[idx, None], n, position, self.cache, live)
            fed = torch.tensor(n, device=self.device).bool()[:, None]
            self.next_logits[idx] = torch.where(fed, logits, self.next_logits[idx])
        if chunks:
            starts = [len(self.prompts[i]) + first for i, (first, _) in chunks.items()]
            logits = self.feed_chunks(list(chunks), [c for _, c in chunks.values()], starts)
            self.next_logits[torch.tensor(list(chunks), device=self.device)] = logits

    def retire_and_push(self, touched):
        for i in touched:
            if self.rows[i].phase == DONE:
                self.cache.retire(i)
        self.push(touched)


@torch.inference_mode()  # not no_grad: no autograd version counting on each small op (~2% on the tiny CPU bench)
def rollout(model, tokenizer, prompts, tools, env="real", *, max_new_tokens=512, max_actions=10, max_context=2048,
            answer_tokens=32, temperature=1.0, top_p=1.0, greedy=False, seed=None, train_sim_obs=False,
            sim_obs_tokens=256, sim_greedy=False, sim_real_tools=(), observe="", tool_batch=1):
    """One trajectory per prompt (token ids) -> list[Rollout], in prompt order. tools: a ToolRegistry. env: "real" calls
    the tools, "sim" lets the policy write the observations (greedily if sim_greedy; sim_real_tools: the tools it still
    calls for real), "none" answers "tools are disabled". seed: an int, or one int per prompt (per-row generators).
    observe (with env="sim"): a tool name; each prompt ends inside its opened result tag and its row only writes that
    observation (the world models: common.simulate). tool_batch: a row paused at an action waits until this many
    have, or no other row runs; one tool call then answers them all (a generating simulator: one batch, not N)."""
    check_model(model)
    s = _setup(tokenizer, tools, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
               train_sim_obs, sim_real_tools, sim_greedy, observe)
    rows = _rows(prompts, s)
    was_training = model.training
    model.eval()
    batch = _Batch(model, tokenizer, prompts, rows, tools, s, seed)  # 0. prefill the prompts
    while any(batch.is_running):
        token = batch.sample_and_record(temperature, top_p, greedy)  # 1. one token per running row, recorded
        events = batch.stop_checks(token)                             # 2. eos / tags / budgets; the one sync
        touched = batch.on_events(events)                             # 3. the state machine, rows with an event
        earlier = batch.call_tools(touched, tool_batch)               # 4. one tool call for the rows that paused
        chunks = batch.queue_injections(touched, events.token, earlier)  # 5. observations and forced tags queued
        batch.feed_cache(token, chunks)                               # 6. decode forward + injection forward
        batch.retire_and_push(touched + earlier)                      # 7. finished rows leave; state to device
    model.train(was_training)
    lists = [t.tolist() for t in (batch.resp_ids, batch.resp_loss, batch.resp_obs, batch.resp_logp)]
    return [_result(tokenizer, prompts[i], row, *(x[i][:row.length] for x in lists)) for i, row in enumerate(rows)]
