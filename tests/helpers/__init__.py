"""What the tests share, apart from pytest's fixtures (tests/conftest.py):

    tiny       the tiny synthetic dataset's parameters, the two-process run's epochs
    trainset   masks for a synthetic root, tiny params files, the train stage's command
    eval_data  a small dataset with ground truth and a fitted probe checkpoint; the official
               evaluator's scores to compare with
    dvc_repo   a throw-away copy of the project driven through the real `dvc` command
    cdp        a headless Chromium (DevTools protocol) that renders `dvc plots` pages
"""
