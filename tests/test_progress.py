"""Training progress in a log: one plain line per tenth of the run."""

import io

from dlf_bids.models.progress import LogProgress, training_progress


def test_log_progress_prints_a_line_per_tenth_with_the_latest_figures():
    stream = io.StringIO()
    bar = LogProgress(25, "NeuroNet training", stream=stream)
    for i in range(25):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    lines = stream.getvalue().splitlines()
    # every 3 iterations (25 / 10, rounded up), and the last one
    assert [line.split(":")[1].split()[0] for line in lines] == [
        "3/25", "6/25", "9/25", "12/25", "15/25", "18/25", "21/25", "24/25", "25/25"]
    assert "(100 %)" in lines[-1] and "s/it" in lines[-1] and "loss 0.042" in lines[-1]
    assert "loss 0.500" in lines[0]  # the figures set before that update (iteration 2)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    bar = training_progress(2, "DLF training")  # pytest captures stderr: not a terminal
    assert isinstance(bar, LogProgress)
    bar.update(2)
    assert capsys.readouterr().err.startswith("DLF training: 2/2 it (100 %)")
