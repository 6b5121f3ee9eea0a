"""
PPO's pieces of train_rl.py (`--algo ppo`, not in the paper): GAE on a value head (model.ValueHead) over the policy's
own tokens, whitened over the batch (advantages() is ADVANTAGES["ppo"]), and the clipped value loss (in update()).

  - gamma = lambda = 1 (SPEC 5): one reward, on the last policy token; a row without any policy token gets none.
  - Observation tokens are skipped, not zero-reward steps: they are the environment's transition, so the next value of
    a policy token is the value of the next POLICY token.
"""
import torch

from common import all_sum

VF_COEF = 0.5  # weight of the value loss in the total loss


def gae_advantages(token_rewards, values, mask, gamma=1.0, lam=1.0):
    """GAE over the masked-in (policy) tokens of each row, the others skipped -> (advantages, returns), 0 if masked."""
    # token_rewards, values, mask: (B, T)
    m = mask.bool()
    advantages = torch.zeros_like(values)
    last_gae = next_value = torch.zeros_like(values[:, 0])               # (B,) V after the last token = 0 (terminal)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        gae_t = delta + gamma * lam * last_gae
        advantages[:, t] = torch.where(m[:, t], gae_t, 0.0)
        last_gae = torch.where(m[:, t], gae_t, last_gae)
        next_value = torch.where(m[:, t], values[:, t], next_value)
    returns = (advantages + values).masked_fill(~m, 0.0)
    return advantages, returns


def value_loss(values, old_values, returns, mask, num_tokens, clip=0.2):
    """PPO clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), masked, / num_tokens."""
    # values, old_values, returns, mask: (B, T)
    m = mask.bool()
    V, V_old, R = (x.masked_fill(~m, 0.0) for x in (values, old_values, returns))
    V_clipped = V_old + (V - V_old).clamp(-clip, clip)
    loss = 0.5 * torch.max((V - R) ** 2, (V_clipped - R) ** 2)           # (B, T)
    return loss.masked_fill(~m, 0.0).sum() / num_tokens


def masked_whiten(x, mask):
    """(x - mean) / std over the masked-in entries of all ranks; 0 where masked."""
    m = mask.bool()
    n, s, sq = all_sum(torch.stack([m.sum().double(), x[m].double().sum(), (x[m].double() ** 2).sum()]))
    mean = s / n
    var = (sq / n - mean ** 2).clamp(min=0)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).float().masked_fill(~m, 0.0)


def advantages(micro, args):
    """GAE, reward on the last policy token, then masked_whiten; also sets b["returns"]. -> {"explained_variance"}"""
    ev = torch.zeros(5, dtype=torch.float64)  # n, sum R, sum R^2, sum R-V, sum (R-V)^2
    for b in micro:
        mask = b["mask"]
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)  # (B,) last policy token
        rewards = torch.tensor([[s["reward"]] for s in b["seqs"]], dtype=b["old_logp"].dtype, device=mask.device)
        token_rewards = torch.zeros_like(b["old_logp"]).scatter(1, last[:, None], rewards) * mask  # (B, T)
        b["advantages"], b["returns"] = gae_advantages(token_rewards, b["old_values"], mask)  # gamma = lambda = 1
        R, d = b["returns"][mask.bool()].double(), (b["returns"] - b["old_values"])[mask.bool()].double()
        ev += torch.stack([mask.sum().double(), R.sum(), (R ** 2).sum(), d.sum(), (d ** 2).sum()]).cpu()
    whitened = masked_whiten(torch.cat([b["advantages"].flatten() for b in micro]),
                             torch.cat([b["mask"].flatten() for b in micro])).split([b["mask"].numel() for b in micro])
    for b, w in zip(micro, whitened):
        b["advantages"] = w.view_as(b["mask"])
    n, sR, sR2, sd, sd2 = all_sum(ev).tolist()
    var_R, var_d = sR2 / n - (sR / n) ** 2, sd2 / n - (sd / n) ** 2
    return {"explained_variance": 1 - var_d / var_R if var_R > 0 else float("nan")}
