"""A hypothesis-drawn subset of scripts/fuzz.py: mutate a small model, prune it, check the contract.

Every case must end in a valid pruned model (full checker, opens in onnxruntime, same input and
output names) or a clean error (exit 1, one line "spa: error: ...", no output, no temp files), and
must leave the input untouched. The full fuzzer: `python scripts/fuzz.py --cases N --seed S`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
from hypothesis import Phase, assume, given, settings  # noqa: E402
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
from scripts import fuzz  # noqa: E402

pytestmark = pytest.mark.slow  # the whole module: real models, each a prune

SEEDS = [
    REPO / "models" / "torch" / "vgg_legacy.onnx",
    REPO / "models" / "torch" / "resnet_dynamo.onnx",  # weights in external data
    REPO / "models" / "transformers" / "gru_legacy.onnx",
]


@settings(
    max_examples=300,
    deadline=None,
    # the same cases on every run: CI stays reproducible; explore with scripts/fuzz.py
    derandomize=True,
    # no shrinking: each example prunes a model
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    seed_model=st.sampled_from(SEEDS),
    mutation=st.sampled_from(sorted(fuzz.MUTATIONS)),
    mutation_seed=st.integers(0, 2**32 - 1),
    ratio=st.floats(0.1, 0.7),
)
def test_mutated_model_prunes_or_fails_cleanly(seed_model, mutation, mutation_seed, ratio):
    case = fuzz.Case(0, str(seed_model), [mutation], mutation_seed, round(ratio, 3))
    result = fuzz.run_case(case, in_process=True, timeout=120)
    assume(result.outcome != "n/a")  # e.g. delete_external_data on a model without external data
    assert result.outcome in (fuzz.OK, fuzz.CLEAN), (
        f"{mutation} (seed {mutation_seed}) on {seed_model.name} at ratio {case.ratio}: "
        f"{result.note}\n"
        f"{result.reason}\n--- spa -v:\n{result.verbose_stderr[-3000:]}"
    )


def test_a_case_past_its_deadline_is_killed_reported_and_the_run_goes_on(tmp_path):
    """A worker that hangs (or dies) costs its case only: reported as KILLED with its reproducer
    saved, and a fresh worker takes the next case (a Pool would wait for the lost result
    forever)."""
    cases = [fuzz.Case(i, str(SEEDS[0]), ["truncate_bytes"], i, 0.3) for i in range(2)]
    results = list(
        fuzz.run_cases(
            cases,
            1,
            True,
            120,
            str(tmp_path),
            None,
            "python scripts/fuzz.py --seed 0",
            deadline=0.01,
        )
    )
    assert sorted(r.index for r in results) == [0, 1]
    for r in results:
        assert r.outcome == fuzz.KILLED and "no result after" in r.reason, r
        assert (Path(r.saved) / SEEDS[0].name).is_file() and (Path(r.saved) / "case.json").is_file()
