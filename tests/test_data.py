from squash.data import calibration_text, evaluation_text, paragraphs


def test_calibration_and_evaluation_text_never_overlap():
    calib, evals = set(paragraphs(calibration_text())), set(paragraphs(evaluation_text()))
    assert len(calib) > 500 and len(evals) > 150
    assert not calib & evals
    assert 50_000 < len(evaluation_text()) < len(calibration_text())
