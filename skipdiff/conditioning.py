"""What a UNet is conditioned on, behind one interface: nothing, class labels, or text.

Evaluation and sampling ask a conditioning object for the UNet's keyword arguments of a data batch
(:meth:`unet_kwargs`); only this module knows about tokenizers, text encoders, pooled embeddings and
SDXL's added time ids. Text goes through the pipeline's *own* ``encode_prompt`` (its tokenizer(s) and
text encoder(s), clip skip and truncation as the pipeline does them), so a denoising loss measured here
conditions the UNet exactly as the pipeline's sampler does.

* :class:`Unconditional`: DDPM/DDIM/LDM pipelines, unconditional skipdiff runs.
* :class:`ClassLabels`: class-conditional skipdiff runs (``num_class_embeds``); labels come from the
  batch (``labels``) or cycle over the classes when sampling.
* :class:`TextConditioning`: Stable Diffusion 1.x/2.x (one text encoder) and SDXL (two, a pooled
  embedding and the added time ids ``original_size + crop + target_size``); prompts come from the
  batch's ``captions`` or from a prompt list.
"""

from __future__ import annotations

import torch


class Unconditional:
    """A UNet that takes no condition."""

    kind = "none"

    def unet_kwargs(self, batch: dict) -> dict:
        return {}

    def describe(self) -> dict:
        return {"kind": self.kind}


class ClassLabels:
    """A class-conditional UNet with ``num_classes`` class embeddings."""

    kind = "class"

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def unet_kwargs(self, batch: dict) -> dict:
        if "labels" not in batch:
            raise ValueError(
                f"this UNet is class-conditional ({self.num_classes} classes) but the data has no labels "
                "(--label_column)"
            )
        return {"class_labels": batch["labels"]}

    def labels_for(self, indices: list[int]) -> list[int]:
        """Labels of sampled images ``indices``: 0, 1, 2, ... cycling over the classes (balanced)."""
        return [i % self.num_classes for i in indices]

    def describe(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes}


class TextConditioning:
    """Prompts through a Stable Diffusion (1.x/2.x) or SDXL pipeline's own tokenizers and text encoders."""

    kind = "text"

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.xl = hasattr(pipeline, "text_encoder_2")

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @torch.no_grad()
    def prompt_embeddings(self, prompts: list[str], guidance: bool, negative_prompt: str | None = None) -> dict:
        """The ``prompt_embeds`` (and negative / pooled ones) keyword arguments of the pipeline's
        ``__call__`` for ``prompts``: computed once, reused by every skip variant sampled from them."""
        if not prompts:
            raise ValueError("no prompts to embed")
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        if self.xl:
            embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
                prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=negative,
            )
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            if guidance:
                out.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
            return out
        embeds, negative_embeds = self.pipeline.encode_prompt(
            prompts, self.device, 1, guidance, negative_prompt=negative
        )
        return {"prompt_embeds": embeds, **({"negative_prompt_embeds": negative_embeds} if guidance else {})}

    def unet_kwargs(self, batch: dict) -> dict:
        """``encoder_hidden_states`` (and SDXL's ``added_cond_kwargs``) for a batch's ``captions``, without
        classifier-free guidance (the denoising objective the UNet was trained on)."""
        captions = batch.get("captions")
        if captions is None:
            raise ValueError("this pipeline is text-conditioned: the reference data needs captions (--caption_column)")
        embeddings = self.prompt_embeddings(list(captions), guidance=False)
        kwargs = {"encoder_hidden_states": embeddings["prompt_embeds"]}
        if self.xl:
            height, width = batch["pixel_values"].shape[-2:]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": embeddings["pooled_prompt_embeds"],
                "time_ids": self.time_ids((height, width), len(captions)),
            }
        return kwargs

    def time_ids(self, size: tuple[int, int], batch_size: int) -> torch.Tensor:
        """SDXL's micro-conditioning (original size, crop top-left (0, 0), target size) for uncropped
        images of ``size`` (H, W): (batch_size, 6)."""
        pipeline = self.pipeline
        projection = (
            pipeline.text_encoder_2.config.projection_dim
            if pipeline.text_encoder_2 is not None
            else pipeline.unet.config.projection_class_embeddings_input_dim
            - 6 * pipeline.unet.config.addition_time_embed_dim
        )
        ids = pipeline._get_add_time_ids(
            tuple(size), (0, 0), tuple(size), dtype=pipeline.unet.dtype, text_encoder_projection_dim=projection
        )
        return ids.to(self.device).expand(batch_size, -1)

    def describe(self) -> dict:
        encoders = ["text_encoder", "text_encoder_2"] if self.xl else ["text_encoder"]
        return {
            "kind": self.kind,
            "text_encoders": {name: type(getattr(self.pipeline, name)).__name__ for name in encoders},
            "added_time_ids": self.xl,
        }


Conditioning = Unconditional | ClassLabels | TextConditioning
