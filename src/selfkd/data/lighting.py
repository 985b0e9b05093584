"""The ImageNet training augmentation of PS-KD §4.2 (following CutMix/fb.resnet.torch).

Random-resized crop, horizontal flip, colour jitter (brightness, contrast, saturation 0.4) and
AlexNet-style PCA lighting noise (Krizhevsky et al. 2012, §4.1): for an RGB image tensor in
[0, 1], draw α ~ N(0, σ²) per principal component (σ = 0.1) and add, to every pixel,

    Δ = V · (α ⊙ λ)

with λ the eigenvalues and V (columns) the eigenvectors of the 3×3 covariance of ImageNet's RGB
pixel values, the standard values below (fb.resnet.torch's ``pca``). Applied after ToTensor and
before Normalize, as there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import transforms as T

#: eigenvalues of ImageNet's RGB covariance (pixel values in [0, 1])
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
#: the matching eigenvectors, one per column (rows: R, G, B)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
JITTER = 0.4
LIGHTING_STD = 0.1


class Lighting:
    """PCA lighting noise on a 3×H×W float tensor (see the module docstring)."""

    def __init__(
        self,
        alphastd: float = LIGHTING_STD,
        eigval: Sequence[float] = IMAGENET_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
        generator: torch.Generator | None = None,
    ) -> None:
        if alphastd < 0:
            raise ValueError(f"lighting alphastd must be >= 0, got {alphastd}")
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)
        self.generator = generator

    def offset(self, alpha: Tensor) -> Tensor:
        """The per-channel RGB offset V·(α ⊙ λ) for component weights ``alpha`` (3,)."""
        return self.eigvec @ (alpha.float() * self.eigval)

    def __call__(self, image: Tensor) -> Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"Lighting needs a 3×H×W RGB tensor, got {tuple(image.shape)}")
        if self.alphastd == 0:
            return image
        alpha = torch.randn(3, generator=self.generator) * self.alphastd
        return image + self.offset(alpha).to(image.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"Lighting(alphastd={self.alphastd})"


def imagenet_train_transform(
    size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True
) -> T.Compose:
    """RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4) + ToTensor + Lighting + Normalize."""
    flip = [T.RandomHorizontalFlip()] if hflip else []
    return T.Compose(
        [
            T.RandomResizedCrop(size),
            *flip,
            T.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),
            T.ToTensor(),
            Lighting(),
            T.Normalize(list(mean), list(std)),
        ]
    )
