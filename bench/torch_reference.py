"""The PyTorch reference path of a GRIT step (transformers Mistral + the GritLM loss in torch), shared by the
side-by-side benches: bidirectional mean-pooled query and passage passes, contrastive loss with in-batch + hard
negatives, causal LM loss (token mean), summed; AdamW + global-norm clipping, one update per call."""
import numpy as np
import torch
import torch.nn.functional as F
import transformers


def make_torch_step(c, group: int, model_dir: str | None = None):
  """step(batch of numpy arrays, padded as the reference pads) -> loss, for recipe `c` (float32, CPU): a random
  Mistral of c.model, or the pretrained model in `model_dir` (any transformers causal LM)."""
  m = c.model
  torch.manual_seed(0)
  if model_dir:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
  else:
    hf = transformers.MistralConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim, rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps, sliding_window=None,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=False)
    model = transformers.MistralForCausalLM(hf).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=c.optimizer.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  def embed(ids, mask, pool):
    keep = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)  # bidirectional, padding-only mask
    h = model.model(input_ids=ids, attention_mask=keep).last_hidden_state
    pool = pool.float()[..., None]
    return F.normalize((h * pool).sum(1) / pool.sum(1), dim=-1)

  def step(batch):
    tb = {k: torch.from_numpy(np.asarray(v).astype(np.int64)) for k, v in batch.items()}
    q = embed(tb["query_ids"], tb["query_mask"], tb["query_pool_mask"])
    p = embed(tb["passage_ids"], tb["passage_mask"], tb["passage_pool_mask"])
    scores = q @ p.T / c.loss.temperature
    target = torch.arange(q.shape[0]) * group
    loss_rep = F.cross_entropy(scores, target)
    logits = model(input_ids=tb["gen_ids"], attention_mask=tb["gen_mask"]).logits
    loss_gen = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tb["gen_labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
    loss = loss_rep + loss_gen
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())

  return step


def trim_to_longest(batch: dict) -> dict:
  """A padded batch cut to each pass's longest row (what the reference's collator does per batch)."""
  out = dict(batch)
  for name in ("query", "passage", "gen"):
    mask = batch[f"{name}_mask"]
    n = int(mask.sum(1).max())
    for k in [k for k in batch if k.startswith(f"{name}_")]:
      out[k] = batch[k][:, :n]
  return out
