"""Differential privacy of what clients upload: the accountant, noise calibration, the noise generators
and the client-side Gaussian mechanism on the uploaded embeddings or prototypes ([privacy], off by default).

Here, in the algorithm layer, because the client step adds the upload noise: it must run the same in
process and in a Flower ClientApp, so it imports no flwr. The server-side half (clipping and noising the
image-LoRA average with Flower's own helpers) is ``feddtl.methods.central_dp``.

The accountant is Google's dp-accounting (RDP), the backend Flower's own ``RdpAccountant`` wraps: every
epsilon here comes from it, and the noise multiplier is its ``calibrate_dp_mechanism`` answer for the
target (epsilon, delta) over all rounds, not a formula of ours. It is imported on first use only (it takes
seconds to import), so runs without [privacy] never load it.

Unit of privacy of the upload channel: one image's content. Neighbouring clients differ in one image whose
label stays the same (labels, counts and which classes a client holds are uploaded in the clear). Given the
client's uploaded image LoRA (which the server sees anyway), an image moves only its own embedding (two unit
vectors are at most 2 apart) or its class's mean (by at most 2 / n_c): Gaussian noise of standard deviation
z * sensitivity per coordinate, every round, then renormalisation (post-processing). What the LoRA upload
itself reveals is the other channel's business (privacy.lora_epsilon); the two compose.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from feddtl.algorithm.prototypes import class_means
from feddtl.config.privacy_config import PrivacyConfig

EMBEDDING_SENSITIVITY = 2.0
"""L2 distance between two unit vectors, at most: what one image can move its own embedding by."""

UPLOAD_NOISE_TAG = 0x55504C44
"""Mixed into the client seed for the upload-noise generator, so that it is a stream of its own."""
LORA_NOISE_TAG = 0x4C4F5241
"""Mixed into the run seed for the server's image-LoRA noise generator."""


def _rdp_accountant():  # noqa: ANN202 - dp_accounting's type; imported lazily
    from dp_accounting.rdp import RdpAccountant  # seconds to import: only when privacy is on

    return RdpAccountant()


def _gaussian_releases(multiplier: float, releases: int):  # noqa: ANN202
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier), releases)


@functools.lru_cache(maxsize=128)
def noise_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """z: the smallest noise multiplier (noise std / sensitivity) with which ``releases`` Gaussian
    mechanisms compose to (epsilon, delta)-DP, by dp-accounting's RDP accountant (within 1e-6)."""
    if not (epsilon > 0 and 0 < delta < 1 and releases >= 1):
        raise ValueError(f"need epsilon > 0, 0 < delta < 1, releases >= 1; got {epsilon}, {delta}, {releases}")
    import dp_accounting

    return float(
        dp_accounting.calibrate_dp_mechanism(
            _rdp_accountant, lambda z: _gaussian_releases(z, releases), epsilon, delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


def epsilon_spent(multiplier: float, releases: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``releases`` Gaussian mechanisms of noise multiplier ``multiplier``
    (dp-accounting's RDP accountant; 0 before the first release)."""
    if releases <= 0:
        return 0.0
    accountant = _rdp_accountant()
    accountant.compose(_gaussian_releases(multiplier, releases))
    return float(accountant.get_epsilon(delta))


def noise_generator(seed: int, tag: int, seeded: bool = True) -> torch.Generator:
    """A CPU generator for DP noise only: seeded from (seed, tag), a stream apart from every other draw of
    the run, so that turning noise on shifts nothing else; or from the OS's entropy (``seeded=False``)."""
    state = int(np.random.SeedSequence([seed, tag]).generate_state(1)[0]) if seeded else secrets.randbits(63)
    return torch.Generator().manual_seed(state)


@dataclass(frozen=True)
class UploadNoise:
    """The upload channel's noise, as the client step applies it."""

    multiplier: float
    """z: per-coordinate noise std = z * sensitivity."""
    seeded: bool = True
    """privacy.seeded_noise."""

    def generator(self, client_seed: int) -> torch.Generator:
        """The noise generator of one client's local round (``client_seed``: that step's seed)."""
        return noise_generator(client_seed, UPLOAD_NOISE_TAG, self.seeded)


def upload_noise(privacy: PrivacyConfig, rounds: int) -> UploadNoise | None:
    """The upload channel's noise for a run of ``rounds`` rounds (None: privacy.upload_epsilon is off).

    Calibrated for one release per round in every round: a client selected in fewer rounds spends less.
    """
    if privacy.upload_epsilon is None:
        return None
    return UploadNoise(noise_multiplier(privacy.upload_epsilon, privacy.upload_delta, rounds), privacy.seeded_noise)


def _gaussian(shape: torch.Size, std: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def private_embeddings(embeddings: torch.Tensor, noise: UploadNoise, generator: torch.Generator) -> torch.Tensor:
    """Unit-norm embeddings (n, D) -> each plus N(0, (2 z)^2 I), renormalised (so validation still holds)."""
    noisy = embeddings.float().cpu() + _gaussian(embeddings.shape, EMBEDDING_SENSITIVITY * noise.multiplier, generator)
    return F.normalize(noisy, dim=-1).to(embeddings.dtype)


def private_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, noise: UploadNoise, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means of unit-norm embeddings, each plus N(0, (2 z / n_c)^2 I), renormalised; with labels.

    n_c: the client's images of class c (one image moves the mean of its n_c unit vectors by at most 2 / n_c).
    """
    means, classes, counts = class_means(embeddings, labels)
    std = (EMBEDDING_SENSITIVITY * noise.multiplier / counts.to(torch.float32)).unsqueeze(1)
    noisy = means.float().cpu() + _gaussian(means.shape, std, generator)
    return F.normalize(noisy, dim=-1).to(embeddings.dtype), classes
