"""The engine's test oracle: trajectory.py's per-row rules run with no cache, one row at a time, a full forward per
token. Tags are always found by decoding (never by id), so it also checks the engine's one-token fast path."""
import torch

from trajectory import (DONE, SIM, _completed_tag, _environment, _generators, _on_token, _result, _rows, _sample,
                        _setup, _watched)


@torch.no_grad()
def naive_rollout(model, tokenizer, prompts, tools, env="real", *, max_new_tokens=512, max_actions=10,
                  max_context=2048, answer_tokens=32, temperature=1.0, top_p=1.0, greedy=False, seed=None,
                  train_sim_obs=False, sim_obs_tokens=256, sim_greedy=False, sim_real_tools=()):
    """engine.rollout()'s arguments and semantics, written for obviousness, not speed."""
    s = _setup(tokenizer, tools, env, max_new_tokens, max_actions, max_context, answer_tokens, sim_obs_tokens,
               train_sim_obs, sim_real_tools, sim_greedy)
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
            if s.sim_greedy and row.phase == SIM:  # the simulated tool answers greedily (the row still drew)
                token, token_logp = logits.argmax(-1), 0.0
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
