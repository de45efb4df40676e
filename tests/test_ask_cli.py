"""`python -m analysis ask`: the answer on stdout, a `warning:` line per thing the question check finds,
exit 2 with one line for bad input."""

from tests.output_checks import cli, one_line
from tests.paths import TOY

SAMPLE = TOY / "samples" / "sample_0.png"


def test_ask_warns_about_unknown_words_and_still_answers():
    r = cli("ask", TOY / "vlm", "how many sqaures can you see ?", "--image", SAMPLE, "--why", module="analysis")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(".") and "the answer is" in r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings[0].startswith("warning: the model does not know 'sqaures', 'can', 'you'")
    assert "'sqaures' -> 'squares'" in warnings[1]
    assert 'try: "how many squares are there ?"' in warnings[2]
    assert any(line.startswith("why: count = ") and "top 5: " in line for line in r.stderr.splitlines())


def test_a_question_in_the_vocabulary_has_no_warning():
    r = cli("ask", TOY / "math", "what is 3 + 4 ?", module="analysis")
    assert r.returncode == 0 and "warning" not in r.stderr and "the answer is" in r.stdout


def test_bad_input_is_one_line(tmp_path):
    not_image = tmp_path / "x.png"
    not_image.write_text("no picture")
    one_line(cli("ask", TOY / "vlm", "  ", module="analysis"), 2, "question is empty")
    one_line(cli("ask", TOY / "vlm", "how many ?", "--image", tmp_path / "none.png", module="analysis"), 2,
             "none.png", "no such file")
    one_line(cli("ask", TOY / "vlm", "how many ?", "--image", not_image, module="analysis"), 2, "not an image")
    one_line(cli("ask", TOY / "math", "how many ?", "--image", SAMPLE, module="analysis"), 2, "text-only")


def test_exit_code_of_a_real_process(tmp_path):
    r = cli("ask", tmp_path / "missing", "how many circles ?", module="analysis", real=True)
    one_line(r, 2, "missing")
