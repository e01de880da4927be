"""GradCache + train.compile_scope=model + model.lock_image: three graphs, compiled at the first
step only (tests/test_review_compile2.py pins the same for compile_scope=layers).

With a locked tower GradCache calls the whole compiled model three ways per micro-batch: the image
tower alone without autograd, the text tower alone without it, and the text tower again with it.
Checked on CPU with torch.compile (aot_eager): those are three graph signatures captured once,
not a recompilation every step, and none hits Dynamo's recompile limit.
"""

from __future__ import annotations

import test_review_compile2 as compile2
from test_review_compile2 import short_last_eval_batch  # noqa: F401 (a fixture)


def test_locked_tower_whole_model_compiles_three_graphs_once(
    short_last_eval_batch,  # noqa: F811
    tmp_path,
    single_process,
    monkeypatch,
):
    monkeypatch.setitem(compile2.RUN, "train__compile_scope", "model")
    _, graphs_per_step, messages = compile2._train(
        short_last_eval_batch,
        str(tmp_path / "compiled"),
        True,
        model__lock_image="true",
        eval__every=0,  # eval's own graphs are test_review_compile2's; here only the steps'
        train__checkpoint_every=0,
    )
    assert graphs_per_step[0] >= 3 and graphs_per_step[1:] == [0, 0, 0], graphs_per_step
    assert compile2._limit_hits(messages) == []
