"""The VoxelMorph network: a UNet that predicts a stationary velocity field from (moving, fixed)."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ResizeTransform, SpatialTransformer, VecInt, displacement_from_velocity

FEATURES = {
    "vm1": ([16, 32, 32, 32], [32, 32, 32, 32, 8, 8]),
    "vm2": ([16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]),
}
FINE_FEATURES = "vm1"  # the full-resolution stage: vm1's two 8-channel convolutions keep it cheap at full size


# PyTorch's CPU conv3d takes its slow, non-oneDNN path for an input of few channels (the UNets' first
# convolution, moving and fixed image); zero channels with zero weights bring it to the fast path, same result
# (benchmarks/conv_channels.py, idle machine: 79 -> 20 ms for 2 -> 16 channels at 80x96x80 on 2 cores).
FAST_CPU_CHANNELS = 4


class ConvBlock(nn.Module):
    """3x3x3 convolution followed by LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.activation = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = FAST_CPU_CHANNELS - x.shape[1]
        if x.device.type != "cpu" or missing <= 0:
            return self.activation(self.conv(x))
        zeros = (0, 0) * 3 + (0, missing)  # F.pad counts from the last dimension: pad the channel dimension
        return self.activation(F.conv3d(F.pad(x, zeros), F.pad(self.conv.weight, zeros), self.conv.bias, padding=1))


class Unet(nn.Module):
    """VoxelMorph UNet: one conv per level, max-pool down, nearest up, skip connections.

    With ``half_res`` the last upsampling is skipped and the output is at half resolution.
    """

    def __init__(self, in_channels: int, enc_nf: list[int], dec_nf: list[int], half_res: bool = False) -> None:
        super().__init__()
        self.half_res = half_res
        self.encoder = nn.ModuleList()
        channels, skips = in_channels, []
        for nf in enc_nf:
            self.encoder.append(ConvBlock(channels, nf))
            skips.append(nf)
            channels = nf
        self.decoder = nn.ModuleList()
        for level, nf in enumerate(dec_nf[:len(enc_nf)]):
            self.decoder.append(ConvBlock(channels, nf))
            channels = nf
            if not (half_res and level == len(enc_nf) - 1):
                channels += skips[-1 - level]
        self.extras = nn.ModuleList()
        for nf in dec_nf[len(enc_nf):]:
            self.extras.append(ConvBlock(channels, nf))
            channels = nf
        self.out_channels = channels
        self.pool = nn.MaxPool3d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        last = len(self.decoder) - 1
        for level, block in enumerate(self.decoder):
            x = block(x)
            if not (self.half_res and level == last):
                x = torch.cat([self.upsample(x), skips.pop()], dim=1)
        for block in self.extras:
            x = block(x)
        return x


class VxmDense(nn.Module):
    """VoxelMorph dense registration network (Balakrishnan et al. 2019, Dalca et al. 2019).

    With ``residual_stage`` a second UNet sees the moving image warped by the first stage's field and
    predicts a correction; the two velocities add, so the result is still one stationary velocity field.
    With ``fine_stage`` a last UNet at full resolution does the same after the others, whose velocity is
    upsampled to its grid (finer detail than a half-resolution velocity can hold). Input shapes must be
    multiples of 16. ``forward`` returns the warped moving image, the displacement field (voxels, full
    resolution) and the velocity field (at the flow resolution).
    """

    def __init__(self, features: str = "vm2", half_res: bool = True, int_steps: int = 7,
                 residual_stage: bool = False, fine_stage: bool = False) -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features must be one of {sorted(FEATURES)}, not {features!r}")
        enc_nf, dec_nf = FEATURES[features]
        self.config = {"features": features, "half_res": half_res, "int_steps": int_steps,
                       "residual_stage": residual_stage, "fine_stage": fine_stage}
        self.unet = Unet(2, enc_nf, dec_nf, half_res=half_res)
        self.flow = flow_head(self.unet.out_channels)
        if residual_stage:
            self.residual_unet = Unet(2, enc_nf, dec_nf, half_res=half_res)
            self.residual_flow = flow_head(self.residual_unet.out_channels)
        if fine_stage:
            self.fine_unet = Unet(2, *FEATURES[FINE_FEATURES], half_res=False)
            self.fine_flow = flow_head(self.fine_unet.out_channels)
        self.integrate = VecInt(int_steps)
        self.transformer = SpatialTransformer()

    def stages(self) -> list[list[nn.Module]]:
        """The modules of each stage, in order (all but the last are frozen while the last is trained)."""
        stages = [[self.unet, self.flow]]
        if self.config["residual_stage"]:
            stages.append([self.residual_unet, self.residual_flow])
        if self.config["fine_stage"]:
            stages.append([self.fine_unet, self.fine_flow])
        return stages

    def velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Velocity field in voxels of its own grid (half the input size with ``half_res`` and no fine stage)."""
        size = tuple(fixed.shape[2:])
        velocity = single_precision(self.flow, self.unet(torch.cat([moving, fixed], dim=1)))
        if self.config["residual_stage"]:
            warped = self.transformer(moving, self.displacement(velocity, size))
            features = self.residual_unet(torch.cat([warped, fixed], dim=1))
            velocity = velocity + single_precision(self.residual_flow, features)
        if self.config["fine_stage"]:
            warped = self.transformer(moving, self.displacement(velocity, size))
            coarse = ResizeTransform(size[0] / velocity.shape[2])(velocity, size)
            features = self.fine_unet(torch.cat([warped, fixed], dim=1))
            velocity = coarse + single_precision(self.fine_flow, features)
        return velocity

    def displacement(self, velocity: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """Integrate a velocity field and resize it to ``size`` (voxels of that grid)."""
        return displacement_from_velocity(velocity, size, self.integrate.steps)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        velocity = self.velocity(moving, fixed)
        flow = self.displacement(velocity, tuple(fixed.shape[2:]))
        return self.transformer(moving, flow), flow, velocity


def single_precision(head: nn.Conv3d, features: torch.Tensor) -> torch.Tensor:
    """A flow head's velocity in float32 whatever autocast runs the UNets in (``devices.network_dtype``): the
    stages' velocities add up, and a bfloat16 velocity of a few voxels is rounded to about 0.02 voxel."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.float())


def flow_head(channels: int) -> nn.Conv3d:
    """3x3x3 convolution to three velocity components, initialised near zero as in voxelmorph."""
    head = nn.Conv3d(channels, 3, 3, padding=1)
    nn.init.normal_(head.weight, 0.0, 1e-5)
    nn.init.zeros_(head.bias)
    return head
