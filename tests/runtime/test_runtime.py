import numpy as np
import pytest
import torch

from hpedge.runtime.sampler import pack, unpack
from hpedge.runtime.schedule import sigmas


@pytest.mark.parametrize("name", ["sd3.5-large", "sd3.5-medium", "flux.1-schnell", "flux.1-dev"])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("size", [256, 1024])
def test_sigma_schedules_match_the_real_schedulers_as_the_pipelines_call_them(name, steps, size) -> None:
    """Shift 3 (SD3.5), dynamic shifting by image token count (FLUX.1-dev), shift 1 (schnell): the runtime's
    numpy schedule equals diffusers' scheduler called the way StableDiffusion3Pipeline / FluxPipeline call it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hpedge.models.architectures import architecture
    from hpedge.runtime.schedule import calculate_shift

    a = architecture(name)
    cfg = {k: v for k, v in a["scheduler"].items() if not k.startswith("_")}
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    seq = (size // 16) ** 2  # 2x2 patches of the 8x latent
    if a["family"] == "sd3":
        sched.set_timesteps(steps, **({"mu": calculate_shift(sched.config, seq, 1.16)} if cfg.get("use_dynamic_shifting") else {}))
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(sched.config, seq))
    got = sigmas(a["family"], steps, dict(sched.config), seq)
    assert np.array_equal(sched.sigmas.numpy(), got)
    if cfg.get("shift", 1.0) != 1.0 or cfg.get("use_dynamic_shifting"):  # the shift really moves the schedule
        assert not np.allclose(got, sigmas(a["family"], steps, {}, seq), atol=1e-3) or steps == 1


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


def test_engine_variant_says_why_it_cannot_run_here(sd3_package) -> None:
    from hpedge.backends import engines
    from hpedge.errors import HpedgeError
    from hpedge.runtime import Package

    av = engines.can_run(Package(sd3_package, device="cpu").engines)
    if av.ok:  # pragma: no cover - an RTX GPU: the engines run and match the ONNX variant
        import numpy as np

        a = Package(sd3_package, variant="engine").generate(["a 3"], seed=0, steps=2)
        b = Package(sd3_package, variant="int4", device="cpu").generate(["a 3"], seed=0, steps=2)
        assert np.abs(a - b).mean() < 0.05
        return
    import pytest

    with pytest.raises(HpedgeError, match="cannot run this package's tensorrt_rtx engines here: no RTX GPU"):
        Package(sd3_package, variant="engine")
    assert Package(sd3_package).variant == "int4_cpu"  # auto falls back to ONNX Runtime
