"""Held-out evaluation during training: retrieval accuracy of the eval queries against every eval passage and the
generative LM loss, with the train step's own passes (grit_jax.training.grit_objective.GritObjective)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grit_jax import common_types as ct
from grit_jax import objectives
from grit_jax.training import run as run_lib


def make_eval_fns(model_config, config, mesh, rules):
  """Jitted (embed_queries, embed_passages, lm_sums) over global (sharded) batches, called under the mesh and the
  logical-axis rules as the train step is."""
  from grit_jax.training import grit_objective
  from grit_jax.training import step as step_lib

  obj = grit_objective.GritObjective(model_config, config.loss, mesh, rules, config.attn)
  finish = objectives.l2_normalize if config.loss.normalize else (lambda e: e)

  def lm_sums(params, ids, mask, labels):
    """(sum of next-token CE over supervised tokens, their count): an exact token mean over the whole eval set."""
    logits = obj.model.apply({"params": params}, ids, mask, causal=True).logits  # [B, T, V]
    return jnp.sum(objectives.token_cross_entropy(logits, labels)), jnp.sum(labels[:, 1:] != ct.IGNORE)

  def under_mesh(fn):
    return step_lib.MeshFn(mesh, rules, lambda _: jax.jit(fn))

  return (under_mesh(lambda p, i, m, pm: finish(obj.embed_query(p, i, m, pm))),
          under_mesh(lambda p, i, m, pm: finish(obj.embed_passage(p, i, m, pm))),
          under_mesh(lm_sums))


class Evaluator:
  """Held-out retrieval accuracy (each eval query against every eval passage: positives and hard negatives of all
  queries) and the generative LM loss (token mean over the eval chats). Compiled on first use."""

  def __init__(self, run: run_lib.Run, config):
    self.run, self.config, self._fns = run, config, None

  def __call__(self, params) -> dict:
    from grit_jax import data as data_lib

    if self._fns is None:
      self._fns = make_eval_fns(self.run.model_config, self.config, self.run.mesh, self.run.rules)
    embed_q, embed_p, lm_sums = self._fns
    host = run_lib.to_host
    qs, ps, lm_sum, lm_tokens = [], [], 0.0, 0.0
    for batch_np in data_lib.make_eval_iterator(self.config.data, shard_index=jax.process_index(),
                                                num_shards=jax.process_count()):
      batch = data_lib.to_global_batch(batch_np, self.run.mesh)
      if ct.QUERY_IDS in batch:
        # Filler rows (weight 0) complete the last batch; drop them (and their passages).
        keep = np.asarray(host(batch[ct.key(ct.QUERY, ct.WEIGHT)])) > 0  # [Bq]
        q = np.asarray(host(embed_q(params, *(batch[k] for k in ct.padded_keys(ct.QUERY)))))
        p = np.asarray(host(embed_p(params, *(batch[k] for k in ct.padded_keys(ct.PASSAGE)))))
        g = p.shape[0] // q.shape[0]
        qs.append(q[keep])
        ps.append(p.reshape(q.shape[0], g, -1)[keep].reshape(-1, p.shape[-1]))
      if ct.GEN_IDS in batch:
        s, n = host(lm_sums(params, *(batch[k] for k in ct.padded_keys(ct.GEN))))
        lm_sum, lm_tokens = lm_sum + float(s), lm_tokens + float(n)
    out = {}
    if qs:
      q = np.concatenate(qs)  # [Q, D]
      p = np.concatenate(ps)  # [Q * g, D]
      g = p.shape[0] // q.shape[0]
      # each query's positive comes first in its group: one relevant passage, so recall@k = top-k accuracy
      m = objectives.retrieval_metrics(q @ p.T, [{i * g} for i in range(q.shape[0])])  # scores [Q, Q * g]
      out["retrieval_top1"], out["retrieval_top5"] = m["recall@1"], m["recall@5"]
    if lm_tokens:
      out["lm_loss"] = lm_sum / lm_tokens
    return out
