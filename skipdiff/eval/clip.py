"""CLIP score of generated images against their prompts (Hessel et al. 2021; Radford et al. 2021).

    CLIPScore(image, prompt) = max(100 * cos(E_image, E_prompt), 0)

per image, with transformers' ``CLIPModel`` and ``CLIPProcessor`` (``--clip_model``: a Hub id such as
``openai/clip-vit-large-patch14``, the usual choice for Stable Diffusion, or a folder holding both).
This is torchmetrics' ``CLIPScore`` definition (tested equal on a tiny model) with two differences:
the clamp at 0 is applied per image, as the paper defines it, not to the mean; and prompts longer than
the text model's context are truncated by the tokenizer, keeping the end-of-text token whose embedding
CLIP pools (torchmetrics cuts the ids after tokenizing, dropping it). torchmetrics is not used itself:
its 1.9 release reads ``get_image_features`` as a tensor, which transformers 5 no longer returns.
"""

from __future__ import annotations

import statistics

import torch

from .fid import images_to_uint8


def load_clip(name_or_path: str, device: str | torch.device = "cpu", cache_dir: str | None = None):
    """``(CLIPModel, CLIPProcessor)`` from a Hub id or a folder; ``ValueError`` when they cannot be loaded."""
    # heavy: CLIP's modelling code (~0.3 s) only when a CLIP score is asked for
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name_or_path, cache_dir=cache_dir)
        processor = CLIPProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the CLIP model {name_or_path!r} (--clip_model: a Hub id, which needs internet, or a "
            f"folder with a CLIPModel and its CLIPProcessor): {str(err).splitlines()[0]}"
        ) from err
    return model.eval().requires_grad_(False).to(device), processor


@torch.no_grad()
def images_to_clip_scores(
    images: torch.Tensor, prompts: list[str], model, processor, batch_size: int = 64
) -> torch.Tensor:
    """uint8 images (N, C, H, W) and N prompts -> (N,) CLIP scores, ``max(100 * cos, 0)`` each."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images (N, C, H, W) (see images_to_uint8), got {images.dtype} {tuple(images.shape)}"
        )
    if len(prompts) != images.shape[0]:
        raise ValueError(f"need one prompt per image: {images.shape[0]} images, {len(prompts)} prompts")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # (N, 3, H, W): CLIP takes RGB
    device = next(model.parameters()).device
    context = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(prompts), batch_size):
        inputs = processor(
            text=prompts[start : start + batch_size],
            images=list(images[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=context,
        )
        out = model(**{key: value.to(device) for key, value in inputs.items()})
        cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)  # (B,): both are unit vectors
        scores.append((100 * cosine).clamp_min(0).float().cpu())
    return torch.cat(scores)


def clip_score_summary(per_seed: dict[int, tuple[torch.Tensor, list[str]]], model_name: str, model, processor) -> dict:
    """CLIP score per seed (mean over images) of ``{seed: (images (N, C, H, W) in [-1, 1] or uint8, prompts)}``,
    and their mean and sample std over seeds (None for one seed)."""
    rows = []
    for seed, (images, prompts) in per_seed.items():
        pixels = images if images.dtype == torch.uint8 else images_to_uint8(images)
        scores = images_to_clip_scores(pixels, prompts, model, processor)
        rows.append({"seed": seed, "clip_score": float(scores.mean()), "num_images": len(prompts)})
    values = [row["clip_score"] for row in rows]
    return {
        "model": model_name,
        "per_seed": rows,
        "summary": {
            "clip_score": {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
            }
        },
        "definition": "mean over images of max(100 * cos(image, prompt), 0)",
    }
