"""The README's run command: the tour prints the split and each slot's text."""

from workbench.cli import main


def test_tour_runs_on_the_default_mesh(capsys):
    assert main(["tour", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 4} over 8 cpu devices" in out
    for collection in ("params", "cache", "rest"):
        assert f"  {collection} " in out
    assert out.count("-> insert into slot") == 3
    assert "compiles: {'prefill': 2, 'insert': 1, 'generate': 1}" in out
