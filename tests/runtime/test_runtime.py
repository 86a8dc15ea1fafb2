import numpy as np
import pytest
import torch

from hpedge.runtime import pack, sigmas, unpack


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_sigma_schedules_match_the_stock_pipelines(random_sd3, random_flux, steps) -> None:
    from hpedge.models.loading import load_pipeline

    sd3 = load_pipeline(str(random_sd3))
    sd3.scheduler.set_timesteps(steps)
    assert np.allclose(sd3.scheduler.sigmas.numpy(), sigmas("sd3", steps), atol=1e-6)
    flux = load_pipeline(str(random_flux))
    flux.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.0)
    assert np.allclose(flux.scheduler.sigmas.numpy(), sigmas("flux", steps), atol=1e-6)


def test_pack_matches_torch_version() -> None:
    from hpedge.models.denoise import pack as tpack

    x = np.random.default_rng(0).standard_normal((2, 4, 8, 6)).astype(np.float32)
    assert np.array_equal(pack(x), tpack(torch.from_numpy(x)).numpy())
    assert np.array_equal(unpack(pack(x), 8, 6), x)
