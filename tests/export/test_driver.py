"""The implementation gate (the runtime vs stock diffusers driving the same graphs) passes a correct package and
fails each sampling bug it exists for, on every real-configuration fixture's package."""
from collections.abc import Callable

import numpy as np
import pytest

from hpedge.errors import HpedgeError
from hpedge.export.verify import implementation_check
from hpedge.runtime import package as package_module
from hpedge.runtime.format import load_implementation_reference
from hpedge.runtime.package import Package
from hpedge.targets.profiles import profile_from_dict
from tests.conftest import REAL, read_json

OTHER_PROMPT = "a small green house under a grey sky"


def _shift(monkeypatch: pytest.MonkeyPatch, pkg: Package) -> None:  # sigmas shifted once more (shift x2)
    base = package_module.sigmas
    monkeypatch.setattr(package_module, "sigmas", lambda *a: 2 * base(*a) / (1 + base(*a)))


def _guidance(monkeypatch: pytest.MonkeyPatch, pkg: Package) -> None:  # sampled at another guidance than asked
    gen = pkg.generate
    monkeypatch.setattr(pkg, "generate", lambda p, guidance=None, **kw: gen(p, guidance=guidance + 1.5, **kw))


def _t5_cut(monkeypatch: pytest.MonkeyPatch, pkg: Package) -> None:
    """T5 reads 4 tokens of the prompt, padded back to the graph's length (a package's T5 graph takes exactly the
    export's length, so a wrong length in the runtime is an error, tested below; cutting is the silent form)."""
    tok, pad = pkg.tokenize, pkg.manifest["generation"]["tokenizers"]["t5_ids"]["pad_id"]

    def cut(ps: list[str]) -> dict[str, np.ndarray]:
        ids = tok(ps)
        t5 = np.full_like(ids["t5_ids"], pad)
        t5[:, :4] = ids["t5_ids"][:, :4]
        return {**ids, "t5_ids": t5}

    monkeypatch.setattr(pkg, "tokenize", cut)


def _prompt(monkeypatch: pytest.MonkeyPatch, pkg: Package) -> None:  # conditioned on another prompt
    tok = pkg.tokenize
    monkeypatch.setattr(pkg, "tokenize", lambda ps: tok([p and OTHER_PROMPT for p in ps]))


def _cfg_off(monkeypatch: pytest.MonkeyPatch, pkg: Package) -> None:  # the conditional branch alone
    gen = pkg.generate
    monkeypatch.setattr(pkg, "generate", lambda p, guidance=None, **kw: gen(p, guidance=1.0, **kw))


def _transposed(monkeypatch: pytest.MonkeyPatch, pkg: Package) -> None:  # latents decoded with h and w swapped
    dec = pkg.decode
    monkeypatch.setattr(pkg, "decode", lambda x: dec(np.ascontiguousarray(x.transpose(0, 1, 3, 2))))


BUGS: dict[str, Callable[[pytest.MonkeyPatch, Package], None]] = {
    "wrong shift": _shift, "wrong guidance": _guidance, "T5 prompt cut": _t5_cut, "prompt swapped": _prompt,
    "CFG off": _cfg_off, "latents transposed": _transposed}


def _applies(bug: str, kind: str, guidance: float) -> bool:
    if bug == "CFG off":
        return kind in ("cfg", "true_cfg") and guidance > 1  # SD3.5 Large Turbo samples without CFG
    if bug == "wrong guidance":
        return kind != "none"  # FLUX.1-schnell takes no guidance at all
    return True


def _gate(path, pkg: Package) -> tuple[float, bool]:
    impl = read_json(path / "manifest.json")["parity"]["implementation"]
    latents, driven = load_implementation_reference(path, impl)
    g = impl["generation"]
    try:
        img = pkg.generate([impl["prompt"]], steps=g["steps"], guidance=g["guidance"], latents=latents)
    except HpedgeError:  # e.g. a graph refusing the wrong text length: the check fails as loudly
        return 0.0, False
    limit = profile_from_dict(pkg.manifest["target"], "manifest target").parity.impl_min_psnr_db
    check = implementation_check(pkg.variant, img, driven, limit)
    return check.metrics.get("min_psnr_db", 0.0), check.passed


@pytest.mark.parametrize("name", REAL)
def test_implementation_gate_passes_the_package_and_fails_each_sampling_bug(real_chain, name, monkeypatch) -> None:
    c = real_chain(name)
    assert c["results"]["export"].exit_code == 0, c["results"]["export"].output
    parity = read_json(c["package"] / "parity.json")
    impl = next(x for x in parity["checks"] if x["name"].startswith("implementation: package runtime"))
    assert impl["passed"] and impl["metrics"]["min_psnr_db"] >= impl["limits"]["min_psnr_db"] == 40.0
    pkg = Package(c["package"], variant="int4_cpu", device="cpu")
    psnr, ok = _gate(c["package"], pkg)
    assert ok and psnr >= 40.0, psnr
    caught = {}
    guidance = read_json(c["package"] / "manifest.json")["parity"]["implementation"]["generation"]["guidance"]
    for bug, apply in BUGS.items():
        if _applies(bug, pkg.guidance_kind, guidance):
            with monkeypatch.context() as m:
                apply(m, pkg)
                caught[bug] = _gate(c["package"], pkg)
    assert all(not ok for _, ok in caught.values()), caught
    assert {"wrong shift", "T5 prompt cut", "prompt swapped", "latents transposed"} <= set(caught)
    with monkeypatch.context() as m:  # a wrong T5 length is not silent: the graph refuses it
        spec = pkg.manifest["generation"]["tokenizers"]["t5_ids"]
        m.setitem(spec, "length", spec["length"] // 2)
        m.setattr(pkg, "_toks", {})
        with pytest.raises(HpedgeError, match="t5_ids"):
            pkg.generate(["a cat"], steps=1)
