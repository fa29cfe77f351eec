"""SDXL text conditioning on `transformers` CLIP models.

SDXL conditions its UNet on two CLIP text encoders run on the same prompt:
  context (B, 77, 2048) = concat(penultimate hidden states of CLIP-L (768), of OpenCLIP bigG (1280))
  pooled  (B, 1280)     = bigG's projected EOS token
plus six "micro-conditioning" time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
SDXL-Lightning keeps both encoders frozen and distills only the UNet; its unconditional input for
classifier-free guidance is all zeros ("a guidance scale of 6 without any negative prompts", Sec. 3.6).

The encoders are transformers' CLIPTextModel and CLIPTextModelWithProjection; weights.py loads them from a
diffusers folder or from an original Stability ("SGM") single file (bigG in OpenCLIP's layout there).
"""
import warnings

import torch


# -----------------------------------------------------------------------------
# micro-conditioning and the unconditional input


def time_ids(height, width, crop_top=0, crop_left=0, orig_height=None, orig_width=None):
    """SDXL's six size/crop conditions, (6,) float32: (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w).

    At sampling time the image is neither cropped nor resized, so the original size defaults to the target.
    """
    orig_height = height if orig_height is None else orig_height
    orig_width = width if orig_width is None else orig_width
    values = (orig_height, orig_width, crop_top, crop_left, height, width)
    if min(height, width, orig_height, orig_width) <= 0 or min(crop_top, crop_left) < 0:
        raise ValueError(f"text.py: time_ids needs positive sizes and non-negative crops, got {values}")
    return torch.tensor(values, dtype=torch.float32)


# -----------------------------------------------------------------------------
# the two encoders together


class TextEncoders(torch.nn.Module):
    """SDXL's two tokenizers and two CLIP text encoders; frozen, as in the paper (only the UNet is
    distilled)."""

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        n, n_2 = tokenizer.model_max_length, tokenizer_2.model_max_length
        if n != n_2:
            raise ValueError(f"text.py: the two tokenizers pad to different lengths ({n} and {n_2}); SDXL "
                             "uses 77")
        for tok, enc in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
            if tok.model_max_length > enc.config.max_position_embeddings:
                raise ValueError(f"text.py: tokenizer model_max_length {tok.model_max_length} exceeds the "
                                 f"text encoder's {enc.config.max_position_embeddings} positions")

    @property
    def device(self):
        return next(self.text_encoder_2.parameters()).device

    @property
    def dtype(self):
        return next(self.text_encoder_2.parameters()).dtype

    @property
    def seq_len(self):
        return self.tokenizer.model_max_length  # 77

    @property
    def context_dim(self):
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size  # 768 + 1280

    @property
    def pooled_dim(self):
        return self.text_encoder_2.config.projection_dim  # 1280

    @staticmethod
    def _tokenize(tokenizer, prompts):
        """Pad with the tokenizer's own pad token (EOS for CLIP-L, "!" for bigG) and truncate to 77."""
        n = tokenizer.model_max_length
        ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True,
                        return_tensors="pt").input_ids
        full = tokenizer(prompts, truncation=False, verbose=False).input_ids  # counted, warned below
        # BOS + (n - 2) tokens + EOS survive; what fell between them is lost
        return ids, [max(len(f) - n, 0) for f in full]  # (B, n), tokens dropped per prompt

    @torch.no_grad()
    def encode(self, prompts, names=None):
        """prompts (list of B str) -> context (B, 77, 2048), pooled (B, 1280) in the encoders' device and
        dtype. A prompt longer than 77 tokens is cut, with a warning that counts the lost tokens (not their
        text, which floods a log); `names` (B str) says which prompt it is, default "prompt i"."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, dropped = self._tokenize(self.tokenizer, prompts)
        ids_2, dropped_2 = self._tokenize(self.tokenizer_2, prompts)
        for i, (n, n_2) in enumerate(zip(dropped, dropped_2)):
            if max(n, n_2) > 0:
                name = names[i] if names is not None else f"prompt {i}"
                warnings.warn(f"text.py: {name} is longer than CLIP's {self.seq_len} tokens; "
                              f"{max(n, n_2)} tokens were dropped", stacklevel=3)
        out = self.text_encoder(ids.to(self.text_encoder.device), output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2.to(self.device), output_hidden_states=True)
        # penultimate layer (before the last block and the final layer norm) of both, as SDXL was trained
        h = out.hidden_states[-2].to(self.device, self.dtype)  # (B, 77, 768)
        context = torch.cat([h, out_2.hidden_states[-2]], dim=-1)  # (B, 77, 768 + 1280)
        return context, out_2.text_embeds  # pooled: final-normed EOS token @ text_projection, (B, 1280)
