"""Evaluation as a library of ``x_to_y`` functions, with an ``evaluate`` entry and a thin CLI on top.

* :mod:`.evaluation`: :func:`evaluate` (options -> eval.json) and :func:`evaluate_target` (a loaded
  :class:`~skipdiff.targets.StudyTarget` and a skip spec -> eval.json: what an inference sweep cell calls);
  :mod:`.options`: :class:`EvalOptions`; :mod:`.results`: eval.json on disk, :func:`compare`,
  :func:`summary_markdown`.
* :mod:`.fid`: images -> uint8 -> features -> statistics -> FID / KID / precision-recall on torch-fidelity,
  :func:`fid_with_floor` (the real-vs-real floor, spread over seeds). Feature extractors: :mod:`.extractors`
  (classifier features as torch-fidelity extractors under weight-hashed names), :mod:`.domain_extractor`
  (the classifier of a built-in image set, trained on the run's own train split), :mod:`.inception`
  (Inception-v3 weights offline), :mod:`.extractor_choice` (a CLI choice -> extractor).
* :mod:`.memorisation`: features or pixels -> nearest-neighbour distances to the train and test splits.
* :mod:`.clip`: images and prompts -> CLIP scores. :mod:`.denoise`: batches -> denoising loss per timestep
  bucket. :mod:`.importance`: -> the skip x timestep importance matrix (one noised batch per bucket,
  replayed prefixes). :mod:`.stability`: stats.jsonl -> gradient stability; the shattering probe.
  :mod:`.compute`: a skip configuration -> inference FLOPs. :mod:`.plots`: PNGs.

Names are imported on first use (like :mod:`skipdiff`), so ``python -m skipdiff.eval --help`` answers
without importing torch. Evaluation reads output folders and pipelines; it imports no training module.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# name -> module (relative to this package) that defines it.
_EXPORTS = {
    # entry points
    "EvalOptions": ".options",
    "evaluate": ".evaluation",
    "evaluate_target": ".evaluation",
    "default_out": ".evaluation",
    "compare": ".results",
    "summary_markdown": ".results",
    "read_results": ".results",
    "result_is_current": ".results",
    "write_results": ".results",
    # what is evaluated
    "StudyTarget": "..targets",
    "load_target": "..targets",
    # FID and feature extractors
    "EXTRACTOR_CHOICES": ".extractor_choice",
    "auto_extractor": ".extractor_choice",
    "resolve_extractor": ".extractor_choice",
    "INCEPTION": ".inception",
    "InceptionUnavailableError": ".inception",
    "inception_kwargs": ".inception",
    "ClassifierFeatureExtractor": ".extractors",
    "ExtractorSpec": ".extractors",
    "classifier_extractor_name": ".extractors",
    "create_extractor": ".extractors",
    "load_extractor": ".extractors",
    "register_classifier_extractor": ".extractors",
    "cached_domain_extractor": ".domain_extractor",
    "train_domain_extractor": ".domain_extractor",
    "FidReport": ".fid",
    "RealImages": ".fid",
    "features_of": ".fid",
    "features_to_fid": ".fid",
    "features_to_kid": ".fid",
    "features_to_prc": ".fid",
    "features_to_statistics": ".fid",
    "fid_with_floor": ".fid",
    "images_to_uint8": ".fid",
    "real_images": ".fid",
    "real_splits": ".fid",
    "reference_and_heldout": ".fid",
    "statistics_to_fid": ".fid",
    # CLIP, denoising loss, importance, stability, compute
    "images_to_clip_scores": ".clip",
    "load_clip": ".clip",
    "denoising_loss_by_bucket": ".denoise",
    "skip_importance": ".importance",
    "replay_flops": ".importance",
    "importance_heatmap": ".importance",
    "stability_from_stats": ".stability",
    "shattering_probe": ".stability",
    "count_spikes": ".stability",
    "forward_flops": ".compute",
    "map_compute": ".compute",
    "memorisation_statistics": ".memorisation",
    "nearest_distances": ".memorisation",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
