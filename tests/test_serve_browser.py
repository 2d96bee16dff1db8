"""The viewer in a real headless browser: `interleaf serve` on a loopback port, Chromium via selenium.

Skipped where no Chromium + chromedriver is installed (`make test` installs Debian's where it can).
Run as a script to take the README screenshot mid-generation:

    python tests/test_serve_browser.py docs/viewer.png [MODEL_DIR [PROMPT [MODE]]]
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_serve import Gate, LiveServer, tiny_model_dir

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    "--window-size=1280,860", "--hide-scrollbars",
)  # fmt: skip

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no headless browser: install Debian's chromium and chromium-driver (make test does where it can)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("selenium") is None, reason="selenium is not installed (pip install -e '.[dev]')"
    ),
]


def start_browser(profile: Path):
    """Headless Chromium with a fresh profile, driven through the system chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(driver, condition, timeout: float = 30, what: str = "condition"):
    """Poll `condition(driver)`; on timeout fail with what the page's status line says."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        status = driver.execute_script("const s = document.getElementById('status'); return s && s.textContent")
        pytest.fail(f"timed out waiting for {what}; the page says: {status!r}")


def submit(driver, url: str, prompt: str, **options) -> None:
    """Open the page, fill in the prompt and options, press Generate."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(driver, lambda d: "parameters" in d.find_element(By.ID, "model-info").text, what="the model description")
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    for name, value in options.items():
        driver.execute_script("document.getElementById(arguments[0]).value = arguments[1]", name, str(value))
    driver.find_element(By.ID, "run").click()


def shows_text_and_image(driver) -> bool:
    """Generated text and a generated image (partial or whole) are both on the page."""
    return driver.execute_script(
        "const t = [...document.querySelectorAll('#doc .text.generated')].map(e => e.textContent).join('');"
        "const img = document.querySelector('#doc figure.generated img');"
        "return t.trim().length > 0 && img !== null && img.complete && img.naturalWidth > 0;"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`interleaf serve` in a subprocess, on a model that writes, draws, then writes on."""
    model = tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), interleave=True)
    port = free_port()
    cmd = [sys.executable, "-m", "interleaf.cli", "serve", str(model), "--port", str(port), "--preview-every", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: one thread is fastest
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 45
    while True:
        try:
            if httpx.get(url + "health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"interleaf serve did not come up:\n{proc.communicate()[0]}")
        time.sleep(0.1)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def browser(tmp_path):
    driver = start_browser(tmp_path / "profile")
    yield driver
    driver.quit()


def test_page_streams_text_and_an_image(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    submit(browser, served, "a red circle above a blue square.", mode="interleaved", seed=1, max_new_tokens=250)
    wait_for(browser, shows_text_and_image, what="text and an image")
    shot = tmp_path / "viewer.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text.startswith("done"), what="the end")

    assert browser.find_element(By.ID, "download").is_enabled()
    assert browser.find_element(By.ID, "cancel").get_attribute("disabled") is not None
    assert "tokens/s" in browser.find_element(By.ID, "stats").text
    figures = browser.find_elements(By.CSS_SELECTOR, "#doc figure.generated")
    assert len(figures) == 1 and "done" in figures[0].get_attribute("class")
    assert figures[0].find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/png;base64,")
    texts = browser.find_elements(By.CSS_SELECTOR, "#doc .text.generated")
    assert len(texts) == 2 and all(t.text.strip() for t in texts)  # text, the image, more text
    prompt_box = browser.find_element(By.CSS_SELECTOR, "#doc .prompt").text
    assert "a red circle above a blue square." in prompt_box
    html = browser.execute_script("return documentHtml()")
    assert html.count('<img src="data:image/png;base64,') == 1 and "http" not in html.replace("http-equiv", "")
    assert browser.execute_script(
        "const texts = [...document.querySelectorAll('#doc .text.generated')].map(e => e.textContent);"
        "return texts.every(t => documentHtml().includes(escapeHtml(t)));"
    )


def test_page_shows_every_option_grouped_and_only_where_it_acts(served, browser):
    """Each sampling option has an input in its group's fieldset, filled with its default; image
    mode hides the text options (and does not send them), text mode the image ones."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from interleaf.sampling.params import OPTIONS

    defaults = httpx.get(served + "api/model").json()["defaults"]  # test_serve checks these
    browser.get(served)
    wait_for(browser, lambda d: "parameters" in d.find_element(By.ID, "model-info").text, what="the model")
    for name, option in OPTIONS.items():
        field = browser.find_element(By.CSS_SELECTOR, f"#group-{option.group} #{name}")
        default = defaults[name]
        shown = field.get_attribute("value")
        assert shown == ("" if default is None else str(default)) or float(shown) == default, (name, shown)

    def visible(name):
        return browser.find_element(By.ID, name).is_displayed()

    text_only = [n for n, o in OPTIONS.items() if o.group == "text"]
    image_only = [n for n, o in OPTIONS.items() if o.group == "image"]
    assert text_only and image_only and all(map(visible, text_only + image_only))  # interleaved: all
    Select(browser.find_element(By.ID, "mode")).select_by_value("image")
    assert not any(map(visible, text_only)) and all(map(visible, image_only))
    assert not browser.find_element(By.ID, "group-text").is_displayed() and not visible("max_images")
    sent = browser.execute_script("return shownOptions().map(o => o.name)")
    assert not set(sent) & set(text_only) and set(image_only) <= set(sent)
    Select(browser.find_element(By.ID, "mode")).select_by_value("text")
    assert all(map(visible, text_only)) and not any(map(visible, image_only))


def test_page_shows_a_refused_upload_and_keeps_working(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    browser.get(served)
    wait_for(browser, lambda d: "parameters" in d.find_element(By.ID, "model-info").text, what="the model")
    browser.find_element(By.ID, "images").send_keys(str(notes))
    browser.find_element(By.ID, "prompt").send_keys("describe this")
    browser.find_element(By.ID, "run").click()
    status = browser.find_element(By.ID, "status")
    wait_for(browser, lambda d: "not an image" in status.text, what="the refusal")
    assert "notes.txt" in status.text and "error" in status.get_attribute("class")
    assert browser.find_element(By.ID, "run").is_enabled()


# ---- the README screenshot -----------------------------------------------------------------------
def screenshot(
    out: Path,
    model_dir: Path | None = None,
    prompt: str = "A red circle above a blue square.",
    mode: str = "interleaved",
    hold_at: int = 40,
) -> None:
    """Serve a model in-process, hold its first image at `hold_at` codes, photograph the page."""
    import torch
    from selenium.webdriver.common.by import By

    from interleaf.pipeline import load
    from interleaf.sampling import generate as G
    from interleaf.serve import ServeLimits, create_app

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        model_dir = model_dir or tiny_model_dir(Path(tmp) / "tiny-random", interleave=True)
        pipe = load(model_dir, device="cpu")
        gate = Gate(G.stream_requests)
        gate.hold_before = hold_at
        mp.setattr(G, "stream_requests", gate)
        n = pipe.vocab.tokens_per_image
        app = create_app(pipe, ServeLimits(), model_name=Path(model_dir).name, preview_every=max(1, n // 8))
        with LiveServer(app) as live:
            driver = start_browser(Path(tmp) / "profile")
            try:
                submit(driver, live.url + "/", prompt, mode=mode, seed=1)
                held = f"{hold_at - 1} / {n} tokens"
                wait_for(driver, lambda d: held in d.find_element(By.ID, "doc").text, timeout=120, what=held)
                time.sleep(0.3)  # let the last preview paint
                driver.save_screenshot(str(out))
            finally:
                gate.gate.set()
                driver.quit()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None, *sys.argv[3:5])
