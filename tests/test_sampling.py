"""The EDM Heun sampler on an exact denoiser reproduces the data distribution."""
import torch

from conftest import ring_means
from disback_core import GaussianMixtureDenoiser
from disback_core.bench.metrics import sliced_wasserstein
from disback_core.sampling import edm_sampler, sampling_sigmas


def test_schedule_endpoints():
    t = sampling_sigmas(18)
    assert t.shape == (19,) and abs(t[0].item() - 80.0) < 1e-12 and abs(t[-2].item() - 0.002) < 1e-15 and t[-1] == 0
    assert (t[1:] < t[:-1]).all()


def test_heun_sampler_on_the_exact_mixture_denoiser_matches_the_data():
    gmm = GaussianMixtureDenoiser(ring_means(), 0.1)
    data, _ = gmm.sample(4000, torch.Generator().manual_seed(1))
    fresh, _ = gmm.sample(4000, torch.Generator().manual_seed(2))
    samples = edm_sampler(gmm, torch.randn(4000, 2, generator=torch.Generator().manual_seed(3)), steps=18)
    floor = sliced_wasserstein(fresh, data)
    assert sliced_wasserstein(samples, data) < 1.5 * floor + 0.02
    one_step = gmm(80.0 * torch.randn(4000, 2), 80.0)  # the one-step denoise collapses to the mean
    assert sliced_wasserstein(one_step, data) > 1.0
