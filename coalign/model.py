"""``CoAlign``: the LightningModule that composes a backbone, a global head and an optional local head."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from huggingface_hub import PyTorchModelHubMixin
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torch import Tensor

from ._features import QueryFeatures, TargetFeatures
from ._hub import HubMixinOverrides
from ._optim import build_optimizer_callable, build_scheduler, optimizer_spec
from .backbones.base import Backbone
from .evaluation.engine import EvaluationOutcome, EvaluationTask, Gallery, encode_gallery, evaluation_step
from .evaluation.pictures import collect_examples
from .feature_cache import FeatureCache, weights_fingerprint
from .heads.base import GlobalHead, LocalHead, soft_cross_entropy, soft_positive_targets
from .heads.global_alignment import ContextualAlignmentHead
from .registry import build_component
from .transforms import ImageTransform

__all__ = ["CoAlign"]

#: ``CoAlign(autocast=...)`` values and the dtype each runs the forward passes in
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


def _append_negatives(batch: dict[str, Any], images: Tensor, ids: list[str]) -> dict[str, Any]:
    """A shallow copy of ``batch`` with ``images`` (and their ``ids``) after its ``negative`` images."""
    out = dict(batch)
    if "negative" in batch:
        out["negative"] = torch.cat([batch["negative"], images])
        out["negative_id"] = [*batch.get("negative_id", [""] * len(batch["negative"])), *ids]
    else:
        out["negative"], out["negative_id"] = images, list(ids)
    return out


def with_reference_negatives(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with each distinct reference image appended to its ``negative`` images (``negative_id`` its
    ``reference_id``); a shallow copy, the input is unchanged. A reference without an id counts as distinct."""
    given = batch.get("reference_id") or [""] * len(batch["reference"])
    ids = [str(r) or f"#reference-{i}" for i, r in enumerate(given)]
    first: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        first.setdefault(image_id, i)
    rows = list(first.values())
    return _append_negatives(batch, batch["reference"][rows], list(first))


#: the five non-identity orders of the RGB channels
_CHANNEL_ORDERS = [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def with_colour_negatives(
    batch: dict[str, Any], mean: Sequence[float], std: Sequence[float], min_change: float = 0.02
) -> dict[str, Any]:
    """``batch`` with each target's colour-permuted copy appended to its ``negative`` images (a shallow copy).

    The channels are permuted in pixel space (``target * std + mean``, permuted, normalised again), one random order
    per image from torch's generator; a copy whose mean absolute change is under ``min_change`` of the range (a
    nearly grey image) is left out. ``negative_id`` is ``<target_id>#<order>``.
    """
    targets = batch["target"]
    m = torch.as_tensor(mean, dtype=targets.dtype, device=targets.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=targets.dtype, device=targets.device).view(1, 3, 1, 1)
    pixels = targets * s + m
    choice = torch.randint(len(_CHANNEL_ORDERS), (len(targets),)).tolist()
    swapped = torch.stack([pixels[i, list(_CHANNEL_ORDERS[c])] for i, c in enumerate(choice)])
    keep = ((swapped - pixels).abs().mean(dim=(1, 2, 3)) >= min_change).nonzero().flatten().tolist()
    ids = [str(t) for t in batch.get("target_id") or [f"#target-{i}" for i in range(len(targets))]]
    negatives = (swapped[keep] - m) / s
    negative_ids = [f"{ids[i]}#{''.join('rgb'[k] for k in _CHANNEL_ORDERS[choice[i]])}" for i in keep]
    return _append_negatives(batch, negatives, negative_ids)


class CoAlign(HubMixinOverrides, L.LightningModule, PyTorchModelHubMixin, library_name="coalign", tags=["cir"]):
    """Composed image retrieval with hybrid contextual alignment.

    Training loss for a batch of triplets::

        L = L_GCA(q, t; groups) + local_loss_weight * L_LCR(q_tokens, t_tokens; groups)

    Retrieval score: ``s(q, t) = global_head.similarity(q, t)``; with a local head and ``rerank_top_k = K > 0``
    the global top-K are re-scored as ``s + rerank_weight * r`` where ``r`` is the local head's score.

    Args:
        backbone: encodes composed queries and targets (e.g. ``Blip2Backbone``, ``CLIPBackbone``,
            ``TinyBackbone``).
        global_head: global contextual alignment head (None: ``ContextualAlignmentHead()``).
        local_head: optional local contextual reasoning head (e.g. ``TokenReasoningHead``).
        local_loss_weight: weight of the local head's auxiliary loss.
        rerank_top_k: re-rank this many global candidates with the local head at inference (0: off).
        rerank_weight: weight of the local score when re-ranking.
        target_pad_ratio: pad images to this aspect ratio before resizing (1.25 for real-image benchmarks,
            as CLIP4Cir/SPRC do); None uses the backbone's plain resize and centre crop.
        optimizer: optimizer factory, called with the trainable parameters.
        lr_scheduler: optional scheduler factory, called with the optimizer; stepped every step.
        init_from: initialise the weights from a registered model name, a Hub id or a folder written by
            ``save_pretrained`` (fine-tuning); None keeps the backbone's own initialisation.
        feature_cache: a folder where training stores the outputs of the backbone's frozen image encoder (its
            image stem: the BLIP-2 ViT, a frozen CLIP vision tower), computed once per image and read back on
            later epochs (:mod:`coalign.feature_cache`); None computes them every step. Needs a frozen image
            encoder and a training transform without random augmentation. A property of the run, not of the
            model: not saved with it.
        autocast: ``"bf16"`` runs the forward passes (training and the encode methods) under
            ``torch.autocast`` in bfloat16 on the model's device, as Lightning's ``precision="bf16-mixed"`` does,
            for plain PyTorch loops too; the encode methods still return float32 features. None: no autocast.
        reference_negatives: in training, every query's own reference image is also a negative for the whole
            batch (encoded as a target; one per distinct reference image, dropped where it is some query's
            target). The reference is the hardest negative a CIR model meets: the gallery's nearest image to
            a query is usually its reference, and a recolour or a small move changes few pixels. In-batch
            negatives from other groups never ask the image encoder to see such a change; this does, at the
            cost of one more image forward per distinct reference. Measured on the Shapes zero-shot experiment
            (one seed), it did not help: R@1 55.5 against 56.2 (PERFORMANCE.md, "Zero-shot"). False: none.
        colour_negatives: in training, every target image with its colour channels permuted (a random one of the
            five non-identity orders, per image) is also a negative for the whole batch: the same layout, other
            colours (a red square turns blue or green, a grey background stays grey). Nearly grey images, whose
            permutation changes less than 2% of the range on average, get none. Like the look-alike negatives of
            the Shapes benchmark's training set, it makes colour matter for every edit, not only for recolours.
            False: none.
        caption_loss_weight: weight of an image-caption contrastive term added to the training loss when the
            batch has ``target_caption`` (synthesized data: the LLM's description of each target image): the
            backbone's :meth:`~coalign.backbones.Backbone.encode_caption` features are aligned with the target
            embeddings by InfoNCE in both directions (the same image is a positive however often it appears). It
            is BLIP-2's image-text contrastive pretraining, for a text tower that starts from scratch. Measured on
            the Shapes zero-shot experiment (one seed) it did not make the text tower see colour: R@1 53.5 at 0.5
            against 56.2 without (PERFORMANCE.md, "Zero-shot"). 0: off.

    Raises:
        ValueError: ``rerank_top_k < 0``, an unknown ``autocast``, or ``feature_cache`` with a backbone whose image
            encoder trains.
    """

    def __init__(
        self,
        backbone: Backbone,
        global_head: GlobalHead | None = None,
        local_head: LocalHead | None = None,
        local_loss_weight: float = 0.1,
        rerank_top_k: int = 0,
        rerank_weight: float = 0.5,
        target_pad_ratio: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
        feature_cache: str | None = None,
        autocast: str | None = None,
        reference_negatives: bool = False,
        caption_loss_weight: float = 0.0,
        colour_negatives: bool = False,
    ):
        super().__init__()
        self.backbone: Backbone = build_component(backbone, Backbone)
        self.global_head: GlobalHead = build_component(global_head, GlobalHead) or ContextualAlignmentHead()
        self.local_head: LocalHead | None = build_component(local_head, LocalHead)
        if self.local_head is not None:
            self.local_head.bind(self.backbone.token_dim)
        if rerank_top_k < 0:
            raise ValueError(f"rerank_top_k must be >= 0, got {rerank_top_k}")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {autocast!r}")
        if feature_cache is not None and not self.backbone.image_stem_frozen():
            raise ValueError(
                f"feature_cache={str(feature_cache)!r} needs a frozen image encoder, and {type(self.backbone).__name__}"
                f"'s ({self.backbone.image_stem_modules() or 'none'}) trains or does not exist: freeze it "
                "(freeze_image_encoder=True) or train without feature_cache"
            )
        self.autocast = autocast
        self.reference_negatives = bool(reference_negatives)
        if caption_loss_weight < 0:
            raise ValueError(f"caption_loss_weight must be >= 0, got {caption_loss_weight}")
        self.caption_loss_weight = float(caption_loss_weight)
        self.colour_negatives = bool(colour_negatives)
        self.feature_cache = None if feature_cache is None else str(feature_cache)
        self._stem_cache: FeatureCache | None = None
        self.local_loss_weight = local_loss_weight
        self.rerank_top_k = rerank_top_k
        self.rerank_weight = rerank_weight
        self.target_pad_ratio = target_pad_ratio
        self.optimizer_factory = build_optimizer_callable(optimizer)
        self.lr_scheduler_factory = build_optimizer_callable(lr_scheduler)
        self.init_from = init_from
        self.card_info: dict[str, Any] = {}
        #: the result of the latest validation or test run over a gallery, for callbacks (None before one)
        self.last_evaluation: EvaluationOutcome | None = None
        self._task: EvaluationTask | None = None
        self._gallery: Gallery | None = None
        self._examples: list[dict[str, Any]] = []
        self.save_hyperparameters(self.config())
        if init_from is not None:
            self.load_weights_from(init_from)

    # -- description -----------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The JSON config (component specs + options) that rebuilds this model; stored as hparams and
        ``config.json``."""
        return {
            "backbone": self.backbone.spec(),
            "global_head": self.global_head.spec(),
            "local_head": None if self.local_head is None else self.local_head.spec(),
            "local_loss_weight": self.local_loss_weight,
            "rerank_top_k": self.rerank_top_k,
            "rerank_weight": self.rerank_weight,
            "target_pad_ratio": self.target_pad_ratio,
            "optimizer": optimizer_spec(self.optimizer_factory),
            "lr_scheduler": optimizer_spec(self.lr_scheduler_factory),
            "autocast": self.autocast,
            "reference_negatives": self.reference_negatives,
            "caption_loss_weight": self.caption_loss_weight,
            "colour_negatives": self.colour_negatives,
        }

    @property
    def preprocess(self) -> ImageTransform:
        """The model's own image transform: PIL image -> normalised tensor of the backbone's size."""
        cfg = self.backbone.image_config
        return ImageTransform(
            cfg["size"],
            cfg["mean"],
            cfg["std"],
            self.target_pad_ratio,
            resample=cfg.get("resample"),
            resize_mode=cfg.get("resize_mode", "shortest_edge"),
        )

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise modification texts with the backbone's tokenizer (``input_ids``, ``attention_mask``)."""
        return self.backbone.tokenize(list(texts))

    # -- inference API ---------------------------------------------------------------------------------------
    def _pixels(self, images: Tensor | Sequence[Image.Image], what: str) -> Tensor:
        if isinstance(images, Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(
                    f"{what}: expected a float tensor [B, 3, H, W] (see model.preprocess) or a list of PIL images, "
                    f"got {tuple(images.shape)} {images.dtype}"
                )
            pixels = images
        elif isinstance(images, Image.Image):
            pixels = self.preprocess.batch([images])
        else:
            images = list(images)
            if not images:
                raise ValueError(f"{what}: got no images")
            pixels = self.preprocess.batch(images)
        return pixels.to(self.device, next(self.backbone.parameters()).dtype)

    def encode_queries(self, reference_images: Tensor | Sequence[Image.Image], texts: Sequence[str]) -> QueryFeatures:
        """Encode composed queries.

        Args:
            reference_images: a float tensor ``[B, 3, H, W]`` already transformed by ``model.preprocess``, or
                a list of PIL images.
            texts: B modification texts.
        """
        pixels = self._pixels(reference_images, "reference_images")
        tokens = self._text_tokens(texts, pixels.shape[0])
        with self._autocast():
            query = self.backbone.encode_query(pixels, tokens["input_ids"], tokens["attention_mask"])
        return query if self.autocast is None else query.to(dtype=torch.float32)

    def _text_tokens(self, texts: Sequence[str], n: int) -> dict[str, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if len(texts) != n:
            raise ValueError(f"got {n} reference images but {len(texts)} texts")
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(f"{len(empty)} modification texts are empty or not strings (positions {empty[:5]})")
        return {k: v.to(self.device) for k, v in self.tokenize(texts).items()}

    def encode_targets(self, images: Tensor | Sequence[Image.Image]) -> TargetFeatures:
        """Encode gallery/target images (a transformed ``[B, 3, H, W]`` tensor or a list of PIL images)."""
        pixels = self._pixels(images, "images")
        with self._autocast():
            target = self.backbone.encode_target(pixels)
        return target if self.autocast is None else target.to(dtype=torch.float32)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in the ``autocast`` dtype on the model's device (a no-op without one, or on meta)."""
        if self.autocast is None or self.device.type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])

    def similarity(self, queries: QueryFeatures | Tensor, targets: TargetFeatures | Tensor) -> Tensor:
        """Global retrieval scores ``[Nq, Nt]`` (higher is better)."""
        q = queries.embedding if isinstance(queries, QueryFeatures) else queries
        t = targets.embedding if isinstance(targets, TargetFeatures) else targets
        return self.global_head.similarity(q, t)

    @torch.no_grad()
    def rerank(self, queries: QueryFeatures, gallery: TargetFeatures, index: Tensor, scores: Tensor):
        """Re-score the first ``rerank_top_k`` of each query's global ranking ``index [Nq, K]`` with the local head
        (``s + rerank_weight * r``); returns the re-sorted ``(index, scores)``, candidates past ``rerank_top_k``
        unchanged behind them. ``gallery`` may live on the CPU; only the candidates' tokens are moved."""
        if self.local_head is None:
            return index, scores
        k = min(self.rerank_top_k, index.shape[1])
        head_index, head_scores = index[:, :k], scores[:, :k]
        tokens = gallery.tokens[head_index.cpu()].to(queries.tokens.device, queries.tokens.dtype)
        local = self.local_head.score_pairs(queries, tokens).to(head_scores.dtype)
        combined = head_scores + self.rerank_weight * local
        order = combined.argsort(dim=1, descending=True)
        new_index = torch.cat([head_index.gather(1, order), index[:, k:]], dim=1)
        new_scores = torch.cat([combined.gather(1, order), scores[:, k:]], dim=1)  # the tail keeps its global order
        return new_index, new_scores

    # -- training --------------------------------------------------------------------------------------------
    def _losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        with self._autocast():
            return self._batch_losses(batch)

    def _batch_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if "target" not in batch:
            raise ValueError("a training batch needs 'target' images (this split has no labels)")
        if self.reference_negatives:
            batch = with_reference_negatives(batch)
        if self.colour_negatives:
            batch = with_colour_negatives(batch, self.preprocess.mean, self.preprocess.std)
        # a hard negative that is some query's own target image would contradict its positive: drop it
        keep: list[int] = []
        if "negative" in batch:
            targets = set(batch.get("target_id", []))
            negative_ids = batch.get("negative_id", [""] * len(batch["negative"]))
            keep = [j for j, n in enumerate(negative_ids) if n not in targets]
        if self.feature_cache is None:
            query = self.encode_queries(batch["reference"], batch["text"])
            target = self.encode_targets(batch["target"])
            negatives = self.encode_targets(batch["negative"][keep]) if keep else None
        else:
            query, target, negatives = self._encode_from_cache(batch, keep)
        groups = batch.get("group")
        codes = reference_codes = None
        if "target_id" in batch:
            # one code per image: equal target codes are the same image (a positive); a reference shares the code
            # of the target showing the same image, so the heads never make a query's own reference a soft positive
            lookup: dict[str, int] = {}
            codes = torch.tensor([lookup.setdefault(t, len(lookup)) for t in batch["target_id"]], device=self.device)
            if "reference_id" in batch:
                reference_codes = torch.tensor(
                    [lookup.get(r, -1) if r else -1 for r in batch["reference_id"]], device=self.device
                )
        global_loss = self.global_head(query, target, groups, codes, negatives, reference_ids=reference_codes)
        losses = {"global_loss": global_loss}
        loss = global_loss
        if self.local_head is not None and self.local_loss_weight > 0:
            local_loss = self.local_head(query, target, groups, codes, negatives, reference_ids=reference_codes)
            losses["local_loss"] = local_loss
            loss = loss + self.local_loss_weight * losses["local_loss"]
        if self.caption_loss_weight > 0 and "target_caption" in batch:
            losses["caption_loss"] = self._caption_loss(batch["target_caption"], target, codes)
            loss = loss + self.caption_loss_weight * losses["caption_loss"]
        losses["loss"] = loss
        with torch.no_grad():
            scores = self.similarity(query, target)
            losses["batch_R@1"] = (
                100.0 * (scores.argmax(dim=1) == torch.arange(len(scores), device=self.device)).float().mean()
            )
        return losses

    def _caption_loss(self, captions: list[str], target: TargetFeatures, codes: Tensor | None) -> Tensor:
        """Symmetric InfoNCE of caption features and target embeddings; equal target codes are one image."""
        tokens = {k: v.to(self.device) for k, v in self.tokenize(list(captions)).items()}
        text = self.backbone.encode_caption(tokens["input_ids"], tokens["attention_mask"])
        temperature = getattr(self.global_head, "temperature", 0.07)
        logits = self.global_head.similarity(text, target.embedding) / temperature
        y = soft_positive_targets(None, len(captions), 0.0, logits.device, codes)
        return 0.5 * (soft_cross_entropy(logits, y) + soft_cross_entropy(logits.T, y.T))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self._losses(batch)
        bs = len(batch["text"])
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, prog_bar=False, batch_size=bs)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        if hasattr(self.global_head, "temperature"):
            self.log("train/temperature", self.global_head.temperature, batch_size=bs)
        return losses["loss"]

    # -- the frozen-encoder feature cache -------------------------------------------------------------------
    def stem_cache(self) -> FeatureCache:
        """The :class:`FeatureCache` of ``feature_cache`` for the current frozen weights (opened on first use).

        Its fingerprint covers the stem's weights, the backbone class, the image transform and ``autocast``, so
        a cache folder used with other weights or preprocessing is never read.
        """
        if self.feature_cache is None:
            raise ValueError("this model has no feature_cache")
        if not self.backbone.image_stem_frozen():  # parameters unfrozen after construction
            raise ValueError(
                f"feature_cache: {type(self.backbone).__name__}'s image encoder is no longer frozen (some of its "
                "parameters require gradients); its outputs change during training and cannot be cached"
            )
        if self._stem_cache is None:
            names = self.backbone.image_stem_modules()
            covers = {
                "backbone": type(self.backbone).__name__,
                "stem_modules": names,
                "transform": self.preprocess.config(),
                "autocast": self.autocast,
            }
            fingerprint = weights_fingerprint({n: self.backbone.get_submodule(n) for n in names}, covers)
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._stem_cache = FeatureCache(self.feature_cache, fingerprint, covers, rank=rank)
        return self._stem_cache

    def _encode_from_cache(self, batch: dict[str, Any], keep: list[int]):
        """Query, target and negative features with the image stem read from (or added to) the feature cache."""
        cache = self.stem_cache()
        references = self._pixels(batch["reference"], "reference_images")
        tokens = self._text_tokens(batch["text"], references.shape[0])
        parts = [references, self._pixels(batch["target"], "images")]
        ids = [batch.get("reference_id", [""] * len(parts[0])), batch.get("target_id", [""] * len(parts[1]))]
        if keep:
            parts.append(self._pixels(batch["negative"][keep], "negative images"))
            negative_ids = batch.get("negative_id", [""] * len(batch["negative"]))
            ids.append([negative_ids[j] for j in keep])
        stems = cache.features(
            torch.cat(parts),
            self.backbone.encode_image_stem,
            ids=[str(i) for part in ids for i in part],
            dtype=references.dtype,
        ).split([len(p) for p in parts])
        query = self.backbone.encode_query_from_stem(stems[0], tokens["input_ids"], tokens["attention_mask"])
        target = self.backbone.encode_target_from_stem(stems[1])
        negatives = self.backbone.encode_target_from_stem(stems[2]) if keep else None
        return query, target, negatives

    def flush_feature_cache(self) -> None:
        """Write the stem features waiting in memory to the cache folder (done at every epoch end and checkpoint)."""
        if self._stem_cache is not None:
            self._stem_cache.flush()

    def on_train_epoch_start(self) -> None:
        if self._stem_cache is not None:
            self._stem_cache.new_epoch()

    def on_train_epoch_end(self) -> None:
        self.flush_feature_cache()

    def on_fit_end(self) -> None:
        self.flush_feature_cache()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.flush_feature_cache()

    # -- evaluation (validation and test share this code) ---------------------------------------------------
    def _eval_start(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        task = datamodule.evaluation_task(stage) if hasattr(datamodule, "evaluation_task") else None
        self._task, self._examples = task, []
        if task is None:
            return
        self._gallery = encode_gallery(
            self, task.gallery, progress=self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
        )
        task.evaluator.to(self.device)
        task.evaluator.check_gallery(self._gallery.ids)

    def _eval_step(self, batch: dict[str, Any], prefix: str) -> None:
        if self._task is None:  # no gallery: in-batch loss and recall
            losses = self._losses(batch)
            self.log_dict({f"{prefix}/{k}": v for k, v in losses.items()}, batch_size=len(batch["text"]))
            return
        index, scores = evaluation_step(self, batch, self._gallery, self._task.evaluator)
        collect_examples(self._examples, batch, index, scores, self._gallery.ids)

    def _eval_end(self, prefix: str) -> None:
        task = self._task
        if task is None:
            return
        metrics = task.evaluator.compute()
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, sync_dist=False)
        # upload files only when a user asked for this split (validate/test), not at every validation of a fit
        uploads = task.upload_files(task.evaluator) if self.trainer.state.fn != "fit" else {}
        self.last_evaluation = EvaluationOutcome(
            stage=prefix,
            split=task.split,
            metrics=metrics,
            examples=self._examples,
            upload_files=uploads,
            gallery_images=getattr(task.gallery, "dataset", None),
        )
        self._task, self._gallery, self._examples = None, None, []

    def on_validation_epoch_start(self) -> None:
        self._eval_start("validate")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Query embeddings of a triplet batch (and target embeddings when the batch has targets)."""
        out: dict[str, Any] = {"query": self.encode_queries(batch["reference"], batch["text"]).embedding.cpu()}
        if "target" in batch:
            out["target"] = self.encode_targets(batch["target"]).embedding.cpu()
        for key in ("reference_id", "target_id", "index"):
            if key in batch:
                out[key] = batch[key]
        return out

    # -- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        # a schedule's length left null (total_steps, T_max) is the run's: max_steps, or epochs x batches
        steps = lambda: self.trainer.estimated_stepping_batches  # noqa: E731  read only when a length is null
        scheduler = build_scheduler(self.lr_scheduler_factory, optimizer, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
