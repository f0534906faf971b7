"""Named ``UNet2DModel`` configs used by the tests, the benchmarks and the training script's presets."""

from __future__ import annotations

UNET_PRESETS: dict[str, dict] = {
    # 1.1M parameters: a 1-channel 16x16 net with attention at 8x8 (the built-in digits).
    "tiny": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ),
    # The DDPM paper's CIFAR-10 net (Ho et al. 2020, App. B): 35,746,307 parameters, attention at 16x16 only,
    # single-head attention, TF-style (0, 1, 0, 1) downsampling pad, sin-first embedding with shift 1.
    "ddpm-cifar10": dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        norm_num_groups=32,
    ),
}
