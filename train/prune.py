"""Static pruning (``dynprune prune``): EFFP and the baselines it is compared with.

EFFP (Ko, Kang, Kim, AICAS 2024; only its description is public, so each open choice is
written down here):

* Indicators: a hidden channel is *prunable* when its BN |gamma| is under ``t``. ``t`` is not
  a fixed constant: it is the global threshold whose kept set just meets the FLOPs (and
  parameter) targets with widths rounded to ``round_to`` (:func:`select_widths`).
* Pruning loss: FLOPs and parameters of the network under a soft indicator
  ``sigmoid((|gamma| - t) / tau)`` (counting each layer's kept filters *and* the kept
  channels of the layer before it, through ``n1 * n2`` in the 3x3 term), pulled to the
  targets: ``alpha * (relu(F/F0 - f) + relu(P/P0 - p))``, added to the detection loss.
* Pruning: every ``interval`` steps the prunable filters are zeroed with their BN weight and
  bias, and held at zero after every optimiser step (the output is exactly the slim model's).
* Regrowing: of the prunable filters, the ``r(i) = R * (1 - i / T)`` with the largest |gamma|
  before pruning are restored from their weights saved just before they were zeroed; ``r``
  falls linearly to 0 at ``T = 0.75`` of the run, so the target is reached gradually.
  From the first pruning step with nothing left to regrow the set is fixed, and the rest of
  the run fine-tunes it (our choice: re-selecting to the end could swap channels in the
  last steps, with no training left to adapt the BN statistics behind them).
* At the end the zeroed filters are removed for real (:func:`slim_model`).

Baselines, each followed by fine-tuning at a tenth of the learning rate: L1 filter norm
(Li et al. ICLR 2017, ``scope`` local or global), Network Slimming (Liu et al. ICCV 2017:
sparsity training with L1 on gammas, one global threshold), and feature-map clustering
(the seed's method).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from dynprune.checkpoint import make_checkpoint, model_from_checkpoint, save_atomic
from dynprune.data.formats import DatasetSpec
from dynprune.flops import CostModel, count_flops, count_parameters
from dynprune.model import Detector
from dynprune.pruning.importance import bn_gamma, cluster_keep, feature_map_statistics, l1_norm
from dynprune.pruning.merge import merge_removed
from dynprune.pruning.select import select_widths
from dynprune.pruning.surgery import hidden_masks, slim_model, zero_filters
from dynprune.train.engine import TrainConfig, Trainer

METHODS = ("effp", "l1", "slim", "fmcluster")


def soft_block_cost(model: Detector, cost: CostModel, t: float, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable FLOPs and parameter fractions under the soft indicator on |gamma|."""
    from dynprune.flops import block_flops, block_params

    flops = torch.tensor(float(cost.fixed - cost.gates))
    params = torch.tensor(float(cost.params - cost.gate_params - sum(block_params(b, b.h1, b.h2)
                                                                     for b in model.blocks)))
    for b, hw in zip(model.blocks, cost.hw):
        n1 = torch.sigmoid((b.cv1.bn.weight.abs() - t) / tau).sum()
        n2 = torch.sigmoid((b.cv2.bn.weight.abs() - t) / tau).sum()
        flops = flops + block_flops(b, hw, n1, n2)
        params = params + block_params(b, n1, n2)
    return flops / (cost.dense - cost.gates), params / (cost.params - cost.gate_params)


class StaticMaskMixin:
    """Holds zeroed filters at zero after every step, in the model and in its EMA."""

    masks: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None

    def apply_masks(self) -> None:
        if self.masks is not None:
            zero_filters(self.model, self.masks)
            zero_filters(self.ema.ema, self.masks)


class EffpTrainer(StaticMaskMixin, Trainer):
    kind = "effp"

    def __init__(self, model: Detector, spec: DatasetSpec, cfg: TrainConfig, flops: float,
                 params: Optional[float] = None, round_to: int = 8, alpha: float = 2.0, interval: int = 10,
                 regrow_end: float = 0.75, log=print) -> None:
        super().__init__(model, spec, cfg, log)
        self.flops_target, self.params_target, self.round_to = flops, params, round_to
        self.alpha, self.interval, self.regrow_end = alpha, interval, regrow_end
        self.cost = CostModel(self.model, cfg.imgsz)
        self.saved: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}  # (block, layer) -> weights before zeroing
        self.zeroed = [[torch.zeros(b.h1, dtype=torch.bool), torch.zeros(b.h2, dtype=torch.bool)]
                       for b in self.model.blocks]
        self.threshold = 0.0
        self.masks = None
        self.final_set = False

    def current_keep(self):
        return select_widths(self.cost, bn_gamma(self.model), self.flops_target, self.params_target,
                             self.round_to, scope="global", normalize=False)

    def extra_loss(self, per_image: torch.Tensor, step: int):
        # On the model's device, one reduction a step (bn_gamma copies each layer to the CPU for selection).
        gammas = torch.cat([bn.weight.detach().abs() for b in self.model.blocks for bn in (b.cv1.bn, b.cv2.bn)])
        tau = max(1e-3, 0.05 * float(gammas.mean()))
        f, p = soft_block_cost(self.model, self.cost, self.threshold, tau)
        loss = torch.relu(f - self.flops_target)
        if self.params_target is not None:
            loss = loss + torch.relu(p - self.params_target)
        return self.alpha * loss, {"F": float(f.detach())}

    def regrow_count(self, step: int, prunable: int) -> int:
        """How many prunable filters are given back: falls linearly to 0 at ``regrow_end``."""
        end = max(1, int(self.regrow_end * self.total_iters))
        return int(round(prunable * max(0.0, 1.0 - step / end)))

    @torch.no_grad()
    def prune_step(self, step: int) -> None:
        gammas = bn_gamma(self.model)
        # Zeroed filters are judged by the |gamma| they had before zeroing.
        for (bi, li), w in self.saved.items():
            if self.zeroed[bi][li].any():
                gammas[bi] = tuple(
                    torch.where(self.zeroed[bi][li], w["gamma"].abs().cpu(), g) if j == li else g
                    for j, g in enumerate(gammas[bi]))
        keep = select_widths(self.cost, gammas, self.flops_target, self.params_target, self.round_to,
                             scope="global", normalize=False)
        kept_gammas = torch.cat([g[i] for pair, idx in zip(gammas, keep) for g, i in zip(pair, idx)])
        self.threshold = float(kept_gammas.min())
        masks = hidden_masks(self.model, keep)
        prunable = [(bi, li, c) for bi, pair in enumerate(masks) for li, m in enumerate(pair)
                    for c in torch.nonzero(~m).flatten().tolist()]
        n_regrow = self.regrow_count(step, len(prunable))
        # The first step with nothing left to regrow fixes the final set; the rest of the run
        # fine-tunes it. Re-selecting later swapped channels with no training left to adapt the
        # BN statistics behind them (demo: AP50 0.909 after epoch 2, 0.481 after a swap in the
        # last steps of epoch 3).
        self.final_set = n_regrow == 0
        by_gamma = sorted(prunable, key=lambda t: -float(gammas[t[0]][t[1]][t[2]]))
        regrow = set(by_gamma[:n_regrow])
        for bi, li, c in prunable:
            if (bi, li, c) in regrow:
                masks[bi][li][c] = True
        changed = False
        for bi, b in enumerate(self.model.blocks):
            for li, layer in enumerate((b.cv1, b.cv2)):
                want_zero = ~masks[bi][li]
                dev = layer.conv.weight.device  # the masks are CPU bookkeeping; the weights may be on a GPU
                newly = (want_zero & ~self.zeroed[bi][li]).to(dev)
                back = (~want_zero & self.zeroed[bi][li]).to(dev)
                key = (bi, li)
                if newly.any():  # remember the weights the filters have just before zeroing
                    w = self.saved.setdefault(key, {
                        "weight": layer.conv.weight.detach().clone(), "gamma": layer.bn.weight.detach().clone(),
                        "beta": layer.bn.bias.detach().clone()})
                    w = self.saved[key] = {k: v.to(dev) for k, v in w.items()}  # resumed: on the CPU
                    w["weight"][newly] = layer.conv.weight[newly]
                    w["gamma"][newly] = layer.bn.weight[newly]
                    w["beta"][newly] = layer.bn.bias[newly]
                if back.any():  # regrow: restore the saved weights, not fresh ones (the EMA follows below)
                    w = self.saved[key] = {k: v.to(dev) for k, v in self.saved[key].items()}  # resumed: on the CPU
                    layer.conv.weight[back] = w["weight"][back]
                    layer.bn.weight[back] = w["gamma"][back]
                    layer.bn.bias[back] = w["beta"][back]
                changed |= bool(newly.any() or back.any())
                self.zeroed[bi][li] = want_zero
        self.masks = masks
        if changed:
            # Measured on the demo: averaging across pruning steps gave AP50 0.81 where the raw
            # weights had 0.91, so the EMA restarts whenever the set of live filters changes.
            self.ema.restart(self.model)
        self.apply_masks()

    def after_step(self, step: int) -> None:
        if not self.final_set and (step % self.interval == 0 or step == self.total_iters - 1):
            self.prune_step(step)
        else:
            self.apply_masks()

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"effp_state": {"zeroed": self.zeroed, "saved": self.saved, "threshold": self.threshold,
                               "final_set": self.final_set}}

    def load_extra(self, ckpt: Dict[str, Any]) -> None:
        st = ckpt.get("effp_state") or {}
        self.zeroed = st.get("zeroed", self.zeroed)
        self.saved = st.get("saved", self.saved)
        self.threshold = st.get("threshold", 0.0)
        self.final_set = st.get("final_set", False)
        if st:  # hold the zeroed filters from the first resumed step (masks are ~zeroed)
            self.masks = [(~z1, ~z2) for z1, z2 in self.zeroed]


class SlimmingTrainer(Trainer):
    """Sparsity training of Network Slimming: L1 on every hidden BN gamma (Liu et al. 2017, Eq. 1)."""

    kind = "slim-sparsity"

    def __init__(self, *a, l1: float = 1e-4, **kw) -> None:
        super().__init__(*a, **kw)
        self.l1 = l1

    def extra_loss(self, per_image: torch.Tensor, step: int):
        reg = sum(g.abs().sum() for b in self.model.blocks for g in (b.cv1.bn.weight, b.cv2.bn.weight))
        return self.l1 * reg, {}


class MaskedTrainer(StaticMaskMixin, Trainer):
    """Fine-tunes a physically slimmed model (no masks needed) or holds given masks."""

    kind = "pruned"

    def after_step(self, step: int) -> None:
        self.apply_masks()


def _finetune(slim: Detector, spec: DatasetSpec, cfg: TrainConfig, log) -> Detector:
    ft_cfg = copy.deepcopy(cfg)
    ft_cfg.lr = cfg.lr / 10  # the baselines' fine-tuning at a tenth of the learning rate
    ft_cfg.out = cfg.out + "/finetune"
    trainer = MaskedTrainer(slim, spec, ft_cfg, log=log)
    trainer.fit()
    return trainer.ema.ema


def prune_checkpoint(weights: str, spec: DatasetSpec, cfg: TrainConfig, method: str = "effp", flops: float = 0.5,
                     params: Optional[float] = None, round_to: int = 8, scope: str = "global",
                     merge: bool = False, log=print) -> Dict[str, Any]:
    """Prune the dense model in ``weights`` to the targets; write ``<out>/best.pt`` (the slim model).

    ``merge``: before the removed channels go, compensate each in the layer that reads it through
    its most similar kept channel (Neuron Merging, :mod:`dynprune.pruning.merge`). EFFP zeroes most
    of its removed channels during training, which leaves them nothing to carry; it merges what the
    final selection removes that training had not zeroed."""
    merged: Tuple[int, int] = (0, 0)

    def merged_if_asked(m: Detector, keep) -> Detector:
        nonlocal merged
        if not merge:
            return m
        m, merged = merge_removed(m, keep)
        log(f"Neuron Merging: {merged[0]} of the {merged[1]} removed hidden channels merged into kept ones")
        return m

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    model, ckpt = model_from_checkpoint(weights)
    if model.gated:
        raise ValueError(f"{weights}: gated; prune the dense checkpoint")
    t0 = time.time()
    cost = CostModel(model, cfg.imgsz)
    if method == "effp":
        trainer = EffpTrainer(model.train(), spec, cfg, flops, params, round_to, log=log)
        trainer.fit()
        final = trainer.ema.ema
        keep = select_widths(cost, bn_gamma(final), flops, params, round_to, scope="global", normalize=False)
        final = merged_if_asked(final.eval(), keep)
        zero_filters(final, hidden_masks(final, keep))
        slim = slim_model(final.eval(), keep)
    else:
        if method == "l1":
            keep = select_widths(cost, l1_norm(model), flops, params, round_to, scope=scope)
        elif method == "slim":
            sp_cfg = copy.deepcopy(cfg)
            sp_cfg.out = cfg.out + "/sparsity"
            trainer = SlimmingTrainer(model.train(), spec, sp_cfg, log=log)
            trainer.fit()
            model = trainer.ema.ema.eval()
            keep = select_widths(cost, bn_gamma(model), flops, params, round_to, scope="global", normalize=False)
        else:  # fmcluster: widths from a uniform ratio, channels from the clusters
            ratio_keep = select_widths(cost, l1_norm(model), flops, params, round_to, scope="local")
            stats = feature_map_statistics(model, spec.train, cfg.imgsz)
            keep = [(cluster_keep(s1, len(k1)), cluster_keep(s2, len(k2)))
                    for (s1, s2), (k1, k2) in zip(stats, ratio_keep)]
        slim = _finetune(slim_model(merged_if_asked(model.eval(), keep), keep), spec, cfg, log)
    wall = time.time() - t0
    slim = slim.eval()
    from dynprune.validate import run_validation

    metrics = run_validation(slim, spec.val, spec.names, cfg.imgsz, batch=cfg.batch)
    result = {
        "method": method, "flops_target": flops, "params_target": params,
        "gflops": count_flops(slim, cfg.imgsz) / 1e9, "dense_gflops": cost.dense / 1e9,
        "params_m": count_parameters(slim) / 1e6, "dense_params_m": count_parameters(model) / 1e6,
        "hidden": slim.cfg.hidden, "train_wall_s": wall, "merge": merge, "merged_channels": merged[0],
        "removed_channels": merged[1] if merge else None,
        **{k: v for k, v in metrics.items() if not isinstance(v, list)},
    }
    result["flops_fraction"] = result["gflops"] / result["dense_gflops"]
    out = make_checkpoint(slim, ckpt["names"], cfg.imgsz, "pruned", data=spec.source, metrics=result,
                          train_config={"extra": (ckpt.get("train_config") or {}).get("extra", {})},
                          source_weights=weights, epoch=cfg.epochs - 1)
    save_atomic(out, f"{cfg.out}/best.pt")
    log(f"{method}: {result['gflops']:.3f} GFLOPs ({result['flops_fraction']:.3f} of dense), "
        f"{result['params_m']:.3f} M params, AP50 {result['ap50']:.4f}, AP50-95 {result['ap50_95']:.4f}, "
        f"{wall:.0f}s -> {cfg.out}/best.pt")
    return result
