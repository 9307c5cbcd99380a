"""The explanation app (`python -m ivpt.app`): its pieces in-process, and the whole app in a real headless Chromium.

The browser test starts the app as a user does (a subprocess on 127.0.0.1, a free port) with a tiny randomly
initialised checkpoint, uploads a synthetic bird through the page, waits for the result, saves a screenshot, then
clicks an example image; both results (prediction, part scores, part maps of every stage, hierarchy figure) are checked
against `explain()` run in this process, and no request of the page may leave the app. It needs Debian's `chromium`
and `chromium-driver` (`make test` installs them) and selenium (the `test` extra).

The README's screenshot comes from the same code, run from the folder holding `demo_output/` after `make demo`:

    python tests/test_app.py docs/app_screenshot.png
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image
import pytest
import torch

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
LABELS = {i: f"bird_{i}" for i in range(NUM_CLASSES)}


# ------------------------------------------------------------------------------------------------------------------
# Helpers shared by the test and the screenshot script
# ------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(args: list[str], cwd: Path, temp_dir: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`python -m ivpt.app <args>` on a free localhost port; returns the process and its URL once it answers."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(temp_dir))
    with open(temp_dir / "app.log", "w") as log:  # the child keeps its own copy of the file descriptor
        process = subprocess.Popen([sys.executable, "-m", "ivpt.app", *args, "--port", str(port)], cwd=cwd, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{(temp_dir / 'app.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s:\n{(temp_dir / 'app.log').read_text()}")


def headless_chromium():
    """A selenium driver for Debian's chromium + chromium-driver (no driver or browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("The app test needs Chromium and its driver: `make test` installs them "
                    "(apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # DevTools events, for `requested_urls`
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200",
                     # no name resolves except localhost: the page cannot reach anything outside this machine
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def requested_urls(browser) -> list[str]:
    """Every URL the page requested so far, failed requests included (DevTools `Network.requestWillBeSent`)."""
    import json

    events = (json.loads(entry["message"])["message"] for entry in browser.get_log("performance"))
    return [event["params"]["request"]["url"] for event in events if event["method"] == "Network.requestWillBeSent"]


def full_page_png(browser) -> bytes:
    """PNG of the whole page, beyond the window (Chrome DevTools `Page.captureScreenshot`)."""
    import base64

    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                              "clip": clip})
    return base64.b64decode(shot["data"])


def page_outputs(browser) -> dict:
    """What the app's output components show now."""
    from selenium.webdriver.common.by import By

    def texts(selector: str) -> list[str]:
        return [element.text for element in browser.find_elements(By.CSS_SELECTOR, selector)]

    return {
        "prediction": browser.find_element(By.CSS_SELECTOR, "#prediction h2").text,
        "label_text": browser.find_element(By.ID, "prediction").text,
        "part_rows": [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
                      for row in browser.find_elements(By.CSS_SELECTOR, "#part-scores .virtual-row")],
        "stage_captions": texts("#stage-maps .caption-label"),
        "num_stage_maps": len(browser.find_elements(By.CSS_SELECTOR, "#stage-maps img")),
        "hierarchy_size": browser.execute_script(
            "const img = document.querySelector('#hierarchy img'); return [img.naturalWidth, img.naturalHeight]"),
    }


def wait_for_result(browser, previous_hierarchy: str | None, timeout: float) -> str:
    """Wait until the hierarchy figure differs from `previous_hierarchy` (its src) and every output image is drawn;
    returns the new src."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def hierarchy_src():
        images = browser.find_elements(By.CSS_SELECTOR, "#hierarchy img")
        return images[0].get_attribute("src") if images else None

    def drawn(_) -> bool:
        images = browser.find_elements(By.CSS_SELECTOR, "#stage-maps img, #hierarchy img")
        loaded = all(img.get_attribute("complete") and int(img.get_attribute("naturalWidth") or 0) for img in images)
        return bool(hierarchy_src() not in (None, previous_hierarchy) and len(images) > 1 and loaded
                    and browser.find_elements(By.CSS_SELECTOR, "#part-scores .virtual-row"))

    WebDriverWait(browser, timeout).until(drawn)
    return hierarchy_src()


def explain_in_browser(browser, url: str, image: Path, screenshot: Path, example: int | None = None,
                       timeout: float = 60.0) -> dict:
    """Open the app, upload `image`, wait until every output is drawn and save a full-page screenshot; then, when
    `example` is given, click that example image and wait for its result. Returns what the page showed after the
    upload (and under `"example"`, after the click), and every URL the page requested (`"requests"`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, timeout).until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#input-image input"))
    browser.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(image))
    hierarchy = wait_for_result(browser, None, timeout)
    shown = page_outputs(browser)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(full_page_png(browser))
    if example is not None:
        browser.find_elements(By.CSS_SELECTOR, "#examples button.gallery-item")[example].click()
        wait_for_result(browser, hierarchy, timeout)
        shown["example"] = page_outputs(browser)
    shown["requests"] = requested_urls(browser)
    return shown


# ------------------------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------------------------


def tiny_checkpoint(folder: Path, with_processor: bool = True) -> Path:
    from ivpt import IvptForImageClassification, make_image_processor

    torch.manual_seed(0)
    config = tiny_config(num_labels=NUM_CLASSES, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    IvptForImageClassification(config).save_pretrained(folder)
    if with_processor:
        make_image_processor(config.image_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("app_checkpoint"))


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> Path:
    """A synthetic CUB_200_2011 folder: 4 classes x 4 images (2 train, 2 test each) at 96 px."""
    from ivpt.data.synthetic import generate_cub

    return generate_cub(tmp_path_factory.mktemp("app_birds"), classes=NUM_CLASSES, images_per_class=4, size=96)


# ------------------------------------------------------------------------------------------------------------------
# In-process tests of the pieces
# ------------------------------------------------------------------------------------------------------------------


def test_examples_are_the_cub_test_split_one_class_after_another(birds, tmp_path):
    from ivpt.app import example_images
    from ivpt.data.cub import read_annotations

    records = read_annotations(birds).records
    test_files = {birds / "images" / r.file_name: r.label for r in records if not r.is_train}
    examples = example_images(birds)
    assert len(examples) == len(test_files) == 2 * NUM_CLASSES and set(examples) == set(test_files)
    assert [test_files[p] for p in examples] == 2 * list(range(NUM_CLASSES))
    assert example_images(birds, limit=3) == examples[:3]

    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "sub/a.jpg"):
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert example_images(folder) == [folder / "b.png", folder / "sub" / "a.jpg"]
    assert example_images(None) == []
    with pytest.raises(FileNotFoundError, match="--examples .*missing: not a folder"):
        example_images(tmp_path / "missing")


def test_outputs_show_the_explanation_of_explain(checkpoint, birds):
    from ivpt import explain
    from ivpt.app import HIERARCHY_CELL_SIZE, OVERLAY_SIZE, example_images, explanation_outputs, load_checkpoint

    model, processor = load_checkpoint(checkpoint)
    image = Image.open(example_images(birds)[0])
    explanation = explain(model, processor, image)
    top, rows, overlays, hierarchy = explanation_outputs(explanation, model.config.id2label)

    probabilities = sorted(explanation.probabilities, reverse=True)
    assert list(top)[0] == explanation.label and len(top) == NUM_CLASSES
    np.testing.assert_allclose(list(top.values()), probabilities, rtol=1e-6)
    assert [row[0] for row in rows] == [f"part {k}" for k in range(explanation.num_parts)]
    np.testing.assert_allclose([row[1] for row in rows], explanation.part_scores, atol=5e-5)
    assert [name for _, name in overlays] == list(explanation.stage_names)
    assert all(tile.size == (OVERLAY_SIZE, OVERLAY_SIZE) for tile, _ in overlays)
    # each tile is the image with the foreground of its stage coloured: tiles of different stages differ
    assert len({np.asarray(tile).tobytes() for tile, _ in overlays}) == len(overlays)
    figure = explanation.plot(cell_size=HIERARCHY_CELL_SIZE)
    assert hierarchy.size == tuple(int(v) for v in figure.get_size_inches() * figure.dpi)


def test_checkpoint_errors_and_processor_fallback(checkpoint, tmp_path, monkeypatch):
    from ivpt.app import load_checkpoint, main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"No checkpoint at demo_output/ivpt \(the demo's\): run `make demo` first "
                                         r"or pass --model"):
        main([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--model empty: not a checkpoint folder"):
        load_checkpoint("empty")
    with pytest.raises(FileNotFoundError, match="--model nobody/no-such-model: neither a checkpoint folder nor a Hub"):
        load_checkpoint("nobody/no-such-model")  # HF_HUB_OFFLINE=1: never reaches the network

    bare = tiny_checkpoint(tmp_path / "bare", with_processor=False)
    _, processor = load_checkpoint(bare)
    assert processor.crop_size == {"height": 64, "width": 64} and processor.do_normalize


def test_console_script_runs_the_app():
    import configparser
    import importlib

    from ivpt.app import main

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in setup["options.entry_points"]["console_scripts"].split("\n") if line)
    module, function = scripts["ivpt-app"].split(":")
    assert getattr(importlib.import_module(module), function) is main


def test_default_examples_are_the_demo_test_images(birds, tmp_path, monkeypatch):
    from ivpt.app import DEFAULT_EXAMPLES, parse_args

    monkeypatch.chdir(tmp_path)
    assert parse_args([]).examples is None
    DEFAULT_EXAMPLES.parent.mkdir(parents=True)
    DEFAULT_EXAMPLES.symlink_to(birds, target_is_directory=True)
    args = parse_args([])
    assert args.examples == str(DEFAULT_EXAMPLES) and args.model == "demo_output/ivpt"
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    assert parse_args(["--examples", "mine"]).examples == "mine"


# ------------------------------------------------------------------------------------------------------------------
# The app in a real browser
# ------------------------------------------------------------------------------------------------------------------


def screenshot_app(out: Path, workdir: Path, example: int | None = None) -> dict:
    """Start the app in `workdir` on its `demo_output/` (after `make demo`) or, when there is none, on a tiny untrained
    checkpoint and synthetic birds written to `workdir/tiny` and `workdir/birds`; upload the first example image and
    save a full-page screenshot to `out`; then click example `example` when given. Returns what the page showed (see
    [`explain_in_browser`]), with the `url`, `model` and `examples` used."""
    from ivpt.app import DEFAULT_EXAMPLES, DEFAULT_MODEL, example_images

    if (workdir / DEFAULT_MODEL).is_dir() and (workdir / DEFAULT_EXAMPLES).is_dir():
        model, args, examples = workdir / DEFAULT_MODEL, [], example_images(workdir / DEFAULT_EXAMPLES)
    else:
        from ivpt.data.synthetic import generate_cub

        model = tiny_checkpoint(workdir / "tiny")
        birds = generate_cub(workdir / "birds", classes=NUM_CLASSES, images_per_class=4, size=96)
        args, examples = ["--model", "tiny", "--examples", "birds/CUB_200_2011"], example_images(birds)
    with tempfile.TemporaryDirectory() as temp_dir:  # the app's log and Gradio's file cache
        process, url = start_app(args, cwd=workdir, temp_dir=Path(temp_dir))
        try:
            browser = headless_chromium()
            try:
                shown = explain_in_browser(browser, url, examples[0], out, example)
            finally:
                browser.quit()
        finally:
            process.terminate()
            process.wait(timeout=30)
    return {**shown, "url": url, "model": model, "examples": examples}


def test_app_in_headless_chromium(tmp_path):
    from ivpt import explain
    from ivpt.app import HIERARCHY_CELL_SIZE, load_checkpoint

    start = time.perf_counter()
    shown = screenshot_app(tmp_path / "app.png", tmp_path, example=3)  # upload examples[0], then click examples[3]
    print(f"app started, driven and screenshotted in {time.perf_counter() - start:.1f} s")

    assert shown["model"] == tmp_path / "tiny"  # no demo_output/ in tmp_path
    model, processor = load_checkpoint(shown["model"])
    for page, image in ((shown, shown["examples"][0]), (shown["example"], shown["examples"][3])):
        expected = explain(model, processor, Image.open(image))
        assert page["prediction"] == expected.label
        assert f"{round(100 * expected.probability)}%" in page["label_text"]
        assert [row[0] for row in page["part_rows"]] == [f"part {k}" for k in range(expected.num_parts)]
        np.testing.assert_allclose([float(row[1]) for row in page["part_rows"]], expected.part_scores, atol=1e-3)
        assert page["num_stage_maps"] == len(expected.stage_names) == len(model.config.n_pro)
        assert page["stage_captions"] == list(expected.stage_names)
        figure = expected.plot(cell_size=HIERARCHY_CELL_SIZE)
        assert page["hierarchy_size"] == [int(v) for v in figure.get_size_inches() * figure.dpi]
    assert shown["part_rows"] != shown["example"]["part_rows"]  # the second result replaced the first
    assert any(url.endswith("/gradio_api/queue/join?") for url in shown["requests"])  # the log is complete
    outside = [url for url in shown["requests"] if not url.startswith((shown["url"], "data:", "blob:"))]
    assert not outside, f"the page requested resources from outside the app: {outside}"
    screenshot = Image.open(tmp_path / "app.png")
    assert screenshot.width >= 1000 and screenshot.height >= 1000


if __name__ == "__main__":  # python tests/test_app.py OUT.png: the README screenshot (see the module docstring)
    sys.path.insert(0, str(REPO))
    target = Path(sys.argv[1]).resolve()
    if (Path.cwd() / "demo_output" / "ivpt").is_dir():
        result = screenshot_app(target, Path.cwd())
    else:
        print("no demo_output/ivpt here: screenshot of a tiny untrained model")
        with tempfile.TemporaryDirectory() as temp:
            result = screenshot_app(target, Path(temp))
    Image.open(target).convert("RGB").save(target, optimize=True)
    print(f"{target}: prediction {result['prediction']}")
