"""`IsomorphicPruner`: the front door. Prunes a copy of a model to a MACs / params budget."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch_pruning as tp
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .budget import Allocation, Budget, ClassRanking, Plan, shared_ratios, solve
from .calibration import calibration_batches, check_batch
from .configuration import IsomorphicPruningConfig
from .counting import CostModel, count_params
from .distributed import all_reduce_gradients, check_same_model_on_all_ranks, shard
from .errors import BudgetError, CalibrationDataError, ConfigurationError, ModelStateError, UnsupportedModelError
from .guards import check_finite_parameters, image_size_error, keeps_global_rng, with_autograd
from .importance import accumulate_gradients, channel_scores
from .isomorphic import IsomorphicClass, PrunableGroup, build_classes, collect_groups
from .latency_model import LatencyModel, Timer, build_latency_model
from .modeling import to_pruned_model
from .reconstruction import reconstruct
from .report import ClassAmount, PruningReport
from .search import CalibrationLoss, ChannelMasks, SearchSummary, global_ratios_at, search_split
from .surgery import apply_plan, layer_widths

logger = logging.getLogger(__name__)


def load_model(name_or_path: str | os.PathLike, random_weights: bool = False, **kwargs: Any) -> nn.Module:
    """The package's one model loader: a pruned checkpoint folder (`load_pruned_model`, which never runs code from
    the folder), a transformers classifier (Hub id or local folder) or a timm model (`timm/<name>`, `hf-hub:...`).

    `random_weights=True` builds a `timm/<name>` model without downloading weights (offline tries).
    """
    name = str(name_or_path)
    from .checkpoint import is_pruned_checkpoint, load_pruned_model

    if is_pruned_checkpoint(name):
        return load_pruned_model(name, **kwargs)
    if random_weights:
        if not name.startswith("timm/"):
            raise ConfigurationError(f"random_weights works with timm/<name> models only, not {name!r}.")
        import timm

        return timm.create_model(name[len("timm/") :].split(".")[0], pretrained=False, **kwargs)
    if name.startswith("timm/") or name.startswith("hf-hub:"):
        import timm

        return timm.create_model(
            name.replace("timm/", "hf-hub:timm/", 1) if name.startswith("timm/") else name, pretrained=True, **kwargs
        )
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(name, **{"trust_remote_code": False, **kwargs})


def load_image_processor(name_or_path: str | None) -> Any:
    """The image processor saved with a transformers model (local folder or Hub id), or None: timm names, folders
    without one, Hub ids offline. Never runs code from the folder."""
    if not name_or_path or str(name_or_path).startswith("timm/"):
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as error:  # a missing processor is not an error: the model's config still gives size/channels
        logger.info("No image processor for %s (%s).", name_or_path, error)
        return None


class IsomorphicPruner:
    """Isomorphic structural pruning of an image classifier.

    ```python
    pruner = IsomorphicPruner.from_pretrained("facebook/deit-small-distilled-patch16-224")
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=1.2e9), calibration_dataset=ds)
    print(pruner.report.summary())
    ```
    """

    def __init__(self, model: nn.Module, base_model_name_or_path: str | None = None):
        if isinstance(model, (str, os.PathLike)):
            raise UnsupportedModelError(
                f"IsomorphicPruner takes a loaded model, got the name {str(model)!r}; load it with "
                f"IsomorphicPruner.from_pretrained({str(model)!r})."
            )
        model = _uncompiled(model)
        self.adapter: ModelAdapter = get_adapter(model)
        self.model = model
        self.base_model_name_or_path = base_model_name_or_path or self.adapter.base_model_name()
        self.pruned_model: nn.Module | None = None
        self.config: IsomorphicPruningConfig | None = None
        self._report: PruningReport | None = None
        self.latency_timer: Timer | None = None  # target_latency: how ops are timed (default: the wall clock)
        self._latency_retry: LatencyModel | None = None  # set during the second pass of a latency-targeted run

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "IsomorphicPruner":
        """Load a transformers classifier (Hub id or local dir), a timm model (`timm/<name>`) or a pruned
        checkpoint folder (to prune it again); see `load_model`."""
        name = str(name_or_path)
        return cls(load_model(name, **kwargs), base_model_name_or_path=name)

    @property
    def report(self) -> PruningReport:
        if self._report is None:
            raise RuntimeError("No pruning has run yet: call pruner.prune(config) first.")
        return self._report

    @keeps_global_rng  # the seed below must not reset the caller's random numbers
    @with_autograd  # a caller under torch.no_grad() still gets its model traced and ranked
    def prune(
        self, config: IsomorphicPruningConfig | None = None, calibration_dataset: Any = None, **config_kwargs: Any
    ) -> nn.Module:
        """Return a pruned copy of the model (the original is never modified), all parameters trainable.

        Pass an `IsomorphicPruningConfig`, or its fields as keyword arguments (`prune(target_macs=1.2e9)`).
        """
        if config is not None and config_kwargs:
            raise ConfigurationError(
                f"Pass either a config or its fields, not both (got config and {sorted(config_kwargs)})."
            )
        if config is not None and not isinstance(config, IsomorphicPruningConfig):
            raise ConfigurationError(
                f"prune() takes an IsomorphicPruningConfig or its fields as keywords, got {config!r:.60}; "
                "e.g. pruner.prune(pruning_ratio=0.5)."
            )
        config = config or IsomorphicPruningConfig.from_dict(config_kwargs)  # a misspelt field is named
        self._check_model()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        _reset_peak_memory(self._device())
        torch.manual_seed(config.seed)
        adapter = self.adapter
        image_size = config.image_size or adapter.image_size()
        criterion, reconstruction, searching = self._data_needs(config, calibration_dataset)
        needs_data = criterion == "taylor" or reconstruction != "none" or searching
        batches, held_out = (
            self._calibration(config, calibration_dataset, image_size, searching) if needs_data else ([], [])
        )

        model = adapter.copy_model(self.model)
        model.eval()
        adapter.make_traceable(model)
        model.requires_grad_(True)  # the pruned copy comes back ready to finetune, even from a frozen teacher
        with _timed(timings, "graph"):
            graph, cost, groups, classes = self._trace(model, config, image_size)
            macs_before, params_before = cost.macs(), count_params(model)

        with _timed(timings, "importance"):
            if criterion == "taylor":
                mine = shard(batches)  # under torchrun / accelerate each process takes its share; sums are all-reduced
                count = all_reduce_gradients(
                    model, accumulate_gradients(model, mine, adapter.outputs, len(mine), adapter.objective)
                )
                logger.info("Taylor importance from %d calibration batches.", count)
            scores = channel_scores(groups, criterion, config.seed)
            if criterion == "taylor" and not any(bool(s.any()) for s in scores.values()):
                logger.warning(
                    "Taylor importance is zero for every channel: the calibration loss has no gradient (a "
                    "single-output head's cross-entropy is always 0). Ranking by magnitude instead."
                )
                scores = channel_scores(groups, "magnitude", config.seed)
            model.zero_grad(set_to_none=True)

        rankings = [ClassRanking.build(c, scores, config.round_to, config.min_heads) for c in classes]
        budget = Budget(rankings, groups, cost)
        latency = None
        if config.target_latency is not None:
            with _timed(timings, "latency_model"):
                example = torch.zeros(1, adapter.num_channels(), image_size, image_size, device=self._device())
                latency = build_latency_model(
                    model,
                    example,
                    adapter.forward,
                    classes,
                    cost,
                    config,
                    macs_before,
                    self.latency_timer,
                    previous=self._latency_retry,
                )
                latency.round_widths(rankings)

        with _timed(timings, "budget"):
            score = None
            if searching:

                def refit(consumers):  # candidates are scored after the reconstruction the final model gets
                    reconstruct(
                        model,
                        self.model,
                        consumers,
                        batches,
                        adapter.forward,
                        reconstruction,
                        config.reconstruction_damping,
                        warn=False,
                    )

                score = CalibrationLoss(
                    model,
                    ChannelMasks(groups),
                    held_out,
                    adapter.outputs,
                    refit if reconstruction != "none" else None,
                    adapter.objective,
                )
            try:
                plan, search = self._solve(budget, rankings, config, score, latency)
            except BudgetError as error:
                if latency is None:
                    raise
                raise BudgetError(f"{error} Latencies are {latency.describe_target()}.") from None
            macs_after = budget.macs(plan)  # counted from the layer shapes before surgery; tests recount the result

        with _timed(timings, "surgery"):
            layers = layer_widths(plan)
            order = {
                name: i for i, (name, _) in enumerate(model.named_modules())
            }  # timm's graph lists blocks last-first
            layers.sort(key=lambda width: order.get(width.name, len(order)))
            removed = apply_plan(graph, plan)
            adapter.finalize(model)

        with _timed(timings, "reconstruction"):
            recovery = reconstruct(
                model, self.model, removed, batches, adapter.forward, reconstruction, config.reconstruction_damping
            )
            adapter.resized(model)

        model = to_pruned_model(model, base_model_name_or_path=self.base_model_name_or_path, share_weights=True)
        if latency is not None:
            with _timed(timings, "latency_check"):
                latency_summary = latency.summarize(
                    model, self.model, plan, (macs_after, macs_before), config.target_latency, self.latency_timer
                )
            if self._latency_retry is None and latency.correct(plan, latency_summary):
                logger.info(
                    "Measured %.4g ms where the latency model predicted %.4g ms: predictions corrected by "
                    "the miss, solving again.",
                    latency_summary.measured_ms,
                    latency_summary.predicted_ms,
                )
                self._latency_retry = latency
                try:
                    return self.prune(config, calibration_dataset)
                except BudgetError as error:  # the correction moved the target out of reach: keep this result
                    logger.warning(
                        "Keeping the first result (%.4g ms measured): after correcting on it, %s",
                        latency_summary.measured_ms,
                        error,
                    )
                finally:
                    self._latency_retry = None
        check_same_model_on_all_ranks(model)  # DDP starts from one model; no-op in a single process
        timings["total"] = time.perf_counter() - started
        self._report = PruningReport(
            base_model=self.base_model_name_or_path,
            architecture=adapter.architecture,
            macs_before=macs_before,
            macs_after=macs_after,
            params_before=params_before,
            params_after=count_params(model),
            image_size=image_size,
            target_macs=config.target_macs,
            target_params=config.target_params,
            target_latency=config.target_latency,
            latency=latency_summary.to_dict() if latency is not None else {},
            pruning_ratio=_removed_fraction(rankings, plan, "channels"),
            head_pruning_ratio=_removed_fraction(rankings, plan, "heads"),
            head_dim_pruning_ratio=_removed_fraction(rankings, plan, "head_dims"),
            classes=[
                ClassAmount(
                    r.isoclass.name, len(r.isoclass.groups), int(r.counts.sum()), int(plan.kept_units[r.isoclass].sum())
                )
                for r in rankings
            ],
            layers=layers,
            timings=timings,
            peak_memory_mb=_peak_memory_mb(self._device()),
            config=config.to_dict(),
            reconstruction=recovery.to_dict(),
            search=search.to_dict() if search else {},
        )
        self.config, self.pruned_model = config, model
        logger.debug("Pruned %s:\n%s", adapter.architecture, self._report.summary())
        return model

    def save_pretrained(
        self, save_directory: str | os.PathLike, image_processor: Any = None, **card_kwargs: Any
    ) -> str:
        """Save the pruned model, `pruning_config.json`, `pruning_report.json`, the model card and its width plot.

        `card_kwargs` go to `hub.create_model_card` (eval_results, finetuning, latency, ...).
        """
        from .card import save_model_card
        from .checkpoint import save_pruned_model

        model = self._require_pruned()
        if image_processor is None:
            image_processor = load_image_processor(self.base_model_name_or_path)
        # The card is written into a staging folder: name the snippets after the target folder, not the stage.
        card_kwargs.setdefault("repo_id", Path(os.path.abspath(save_directory)).name)
        save_pruned_model(
            model,
            save_directory,
            pruning_config=self.config,
            report=self.report,
            image_processor=image_processor,
            base_model_name_or_path=self.base_model_name_or_path,
            write_card=lambda folder: save_model_card(folder, self.report, **card_kwargs),
        )
        return str(save_directory)

    def create_model_card(self, **card_kwargs: Any):
        """The model card (a `huggingface_hub.ModelCard`) built from this run's measured numbers."""
        from .card import create_model_card

        self._require_pruned()
        return create_model_card(self.report, **card_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        save_directory: str | os.PathLike | None = None,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        api: Any = None,
        **card_kwargs: Any,
    ):
        """Save everything locally (kept on failure), then upload it to `repo_id` in one commit."""
        from .hub import push_to_hub, validate_repo_id

        validate_repo_id(repo_id)
        folder = save_directory or os.path.join(os.getcwd(), repo_id.split("/")[-1])
        self.save_pretrained(folder, repo_id=repo_id, **card_kwargs)
        return push_to_hub(
            folder,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            api=api,
        )

    def _require_pruned(self) -> nn.Module:
        if self.pruned_model is None:
            raise RuntimeError("Nothing to save yet: call pruner.prune(config) first.")
        return self.pruned_model

    # -- steps -----------------------------------------------------------------------------------

    def _check_model(self) -> None:
        params = list(self.model.parameters())
        if not params:
            raise ModelStateError("The model has no parameters to prune.")
        if any(p.is_meta for p in params):
            raise ModelStateError(
                "The model is on the meta device (weights not loaded); load real weights first, "
                "e.g. from_pretrained(..., device_map=None)."
            )
        dtypes = {p.dtype for p in params}
        if dtypes != {torch.float32}:
            raise ModelStateError(
                f"The model has parameters of dtype {sorted(map(str, dtypes))}; prune in float32 "
                "(model.float()) and cast the pruned model afterwards."
            )
        check_finite_parameters(self.model, "The model to prune")

    @staticmethod
    def _data_needs(config: IsomorphicPruningConfig, calibration_dataset: Any) -> tuple[str, str, bool]:
        """(importance criterion, reconstruction, whether the budget is searched) given whether data was passed;
        one warning for everything that needed data and falls back without it."""
        criterion, reconstruction = config.importance, config.reconstruction
        if calibration_dataset is None:
            missing = []
            if criterion == "taylor":
                missing.append("Taylor importance needs gradients, using magnitude instead")
                criterion = "magnitude"
            if reconstruction != "none":
                missing.append(f"reconstruction={reconstruction!r} needs it, pruning without it")
                reconstruction = "none"
            if missing:
                logger.warning("No calibration data given: %s.", "; ".join(missing))
        searching = config.budget_policy == "search" and config.pruning_ratio is None
        if searching and calibration_dataset is None:
            raise CalibrationDataError(
                "budget_policy='search' scores splits on calibration data: pass "
                "calibration_dataset=..., or use budget_policy='shared'."
            )
        return criterion, reconstruction, searching

    def _trace(
        self, model: nn.Module, config: IsomorphicPruningConfig, image_size: int
    ) -> tuple[tp.DependencyGraph, CostModel, list[PrunableGroup], list[IsomorphicClass]]:
        """Trace the copy once: torch-pruning's dependency graph, the cost model, the groups and their classes."""
        adapter = self.adapter
        example = torch.zeros(1, adapter.num_channels(), image_size, image_size, device=self._device())
        attentions = adapter.attentions(model)
        with warnings.catch_warnings(), CostModel.recording(model, attentions) as cost:
            # Bare parameters (cls token, position embeddings, layer scales) are pruned on their last
            # dimension, the channel one in every supported family; the support-matrix tests check it.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            try:
                graph = tp.DependencyGraph().build_dependency(  # its one traced forward pass also feeds `cost`
                    model, example, forward_fn=adapter.forward, verbose=False, **adapter.graph_options(model)
                )
            except Exception as error:
                if image_size == adapter.image_size():
                    raise
                raise image_size_error(image_size, adapter.image_size(), error) from error
            adapter.adjust_graph(graph, model)
        adapter.restore(model, self.model)  # the graph is traced: calibration may use fused attention again
        groups = collect_groups(graph, model, attentions, self._ignored(model, config))
        classes = build_classes(
            groups, config.grouping, config.prune_heads and bool(attentions), config.prune_head_dims
        )
        return graph, cost, groups, classes

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _calibration(
        self, config: IsomorphicPruningConfig, data: Any, image_size: int, held_out: bool
    ) -> tuple[list, list[torch.Tensor]]:
        """Batches for importance and reconstruction, and (for the search policy) held-out images to score splits."""
        from .data import ensure_prepared

        data = ensure_prepared(data, self.model)  # raw image / label rows: the model's size and normalisation
        count = config.num_calibration_batches + (config.search_batches if held_out else 0)
        batches = list(calibration_batches(data, config.calibration_batch_size, count, config.seed))
        if not batches:
            raise CalibrationDataError("The calibration data is empty.")
        device = self._device()
        for batch in batches:
            check_batch(batch, self.adapter.num_channels(), image_size)
        batches = [(x.to(device), None if y is None else y.to(device)) for x, y in batches]
        used, extra = batches[: config.num_calibration_batches], batches[config.num_calibration_batches :]
        if held_out and not extra:
            logger.warning(
                "The calibration data has no batches left after the %d used for importance: the search "
                "scores splits on those same batches. Pass more data for a held-out score.",
                len(used),
            )
            extra = used
        return used, [x for x, _ in extra]

    def _ignored(self, model: nn.Module, config: IsomorphicPruningConfig) -> list[nn.Module]:
        ignored = list(self.adapter.classifiers(model))
        names = dict(model.named_modules())
        for wanted in config.ignored_modules:
            matches = [m for n, m in names.items() if n == wanted or n.endswith("." + wanted)]
            if not matches:
                raise ConfigurationError(
                    f"ignored_modules entry {wanted!r} matches no module of {type(model).__name__}."
                )
            ignored += [sub for m in matches for sub in m.modules()]
        return ignored

    def _solve(
        self,
        budget: Budget,
        rankings: list[ClassRanking],
        config: IsomorphicPruningConfig,
        score: CalibrationLoss | None,
        latency: LatencyModel | None,
    ) -> tuple[Plan, SearchSummary | None]:
        def shared(ratio: float) -> dict:
            return shared_ratios(rankings, ratio, config.head_pruning_ratio, config.head_dim_pruning_ratio)

        if config.pruning_ratio is not None:
            return budget.plan(shared(config.pruning_ratio)), None
        if latency is not None:
            name, target, metric = "latency", config.target_latency, latency.predict
        elif config.target_macs is not None:
            name, target, metric = "macs", config.target_macs, budget.macs
        else:
            name, target, metric = "params", config.target_params, budget.params
        low, high = shared(0.0), shared(0.5)
        pinned = {c: r for c, r in low.items() if high[c] == r}  # head ratios the user fixed
        if score is not None:
            starts = {"shared": shared, "global": global_ratios_at(rankings, pinned)}
            plan, summary = search_split(
                budget,
                metric,
                target,
                name,
                starts,
                pinned,
                score,
                config.search_candidates,
                config.seed,
                config.search_finalists,
            )
            summary.calibration_images = sum(len(x) for x in score.batches)
            return plan, summary
        ratios_at = shared
        if config.budget_policy == "allocate":
            ratios_at = Allocation(budget, metric, pinned).ratios_at
        return solve(budget, metric, target, ratios_at, name, pinned=frozenset(pinned)), None


def _uncompiled(model: nn.Module) -> nn.Module:
    """The eager module under `torch.compile` (same parameters): the pruner traces and copies that one, and the pruned
    copy comes back uncompiled (compile it again)."""
    original = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
        logger.info(
            "Pruning the module under torch.compile (%s); compile the pruned model again.", type(original).__name__
        )
        return original
    return model


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the seconds the block takes as `timings[step]` (the report's per-step timings)."""
    tick = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - tick


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float | None:
    """The report's peak memory: the CUDA allocator's peak since `prune` started on a GPU; on a CPU the process's
    peak resident memory (it includes what the process held before pruning, e.g. the model itself); None where the
    platform has no `resource` module (Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _removed_fraction(rankings: list[ClassRanking], plan: Plan, unit: str) -> float:
    """Fraction of all "channels" (outside attention), "heads" or "head_dims" that the plan removes."""
    chosen = [r for r in rankings if r.isoclass.unit == unit]
    total = sum(int(r.counts.sum()) for r in chosen)
    kept = sum(int(plan.kept_units[r.isoclass].sum()) for r in chosen)
    return 1.0 - kept / total if total else 0.0
