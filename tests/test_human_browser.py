"""The rating app driven by a real headless browser (Debian's chromium + chromedriver, selenium):
a rater opens the page, rates 20 pairs with the keyboard, reloads and resumes; the server is
killed with SIGKILL mid-session and restarted; every rating lands in SQLite exactly once; the
analysis then runs on the ratings this browser clicked. CI installs the browser (``make setup``)
and sets ``FCR_REQUIRE_BROWSER=1``, so a missing browser fails there instead of skipping."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fcr.human import analysis
from fcr.human.pairs import build_pair_set, load_pairs
from fcr.paths import REPO_ROOT
from fcr.backends.embedded.data import FASHION_MNIST_CLASSES
from tests.test_human import STUDY_SWEEP, small_spec

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = REPO_ROOT / "build" / "human" / "rating_page.png"
N_RATED, KILL_AFTER, RELOAD_AFTER = 20, 8, 14

pytestmark = [pytest.mark.slow, pytest.mark.browser]
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("FCR_REQUIRE_BROWSER") == "1":
        raise RuntimeError("FCR_REQUIRE_BROWSER=1 but chromium/chromedriver are missing: apt-get install chromium chromium-driver")
    pytest.skip("needs Debian's chromium and chromium-driver (make setup installs them as root)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m fcr.human serve`` in a subprocess."""

    def __init__(self, pair_dir: Path, db: Path, port: int):
        self.args = [sys.executable, "-m", "fcr.human", "serve", "--pairs", str(pair_dir), "--db", str(db),
                     "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start within 60 s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def stored(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT rater_id, pair_id, choice FROM ratings ORDER BY rating_id").fetchall()


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,820"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_rater_rates_with_the_keyboard_survives_a_kill_and_resumes(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    pair_dir, db = tmp_path / "pairs", tmp_path / "ratings.sqlite"
    build_pair_set(STUDY_SWEEP, small_spec(), pair_dir, categories=FASHION_MNIST_CLASSES)
    manifest = load_pairs(pair_dir).set_index("pair_id")
    server = Server(pair_dir, db, free_port())
    server.start()
    wait = WebDriverWait(browser, 30)

    def progress_is(n: int) -> None:
        wait.until(lambda d: d.find_element(By.ID, "progress").text.startswith(f"{n} / "))

    def shown_pair() -> str:
        wait.until(lambda d: d.execute_script("return document.body.dataset.pair && "
                                              "document.getElementById('left').complete"))
        return browser.execute_script("return document.body.dataset.pair")

    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "rater_id").send_keys("lab-rater-1")
        browser.find_element(By.ID, "start").click()
        progress_is(0)
        total = int(browser.find_element(By.ID, "progress").text.split("/")[1].split()[0])
        assert total == len(manifest)
        keys = {"left": Keys.ARROW_LEFT, "right": Keys.ARROW_RIGHT, "tie": Keys.ARROW_DOWN}
        cycle = ["left", "right", "tie", "left", "left"]
        clicked: dict[str, str] = {}
        for i in range(N_RATED):
            pid = shown_pair()
            assert pid not in clicked  # never shown again once rated
            if i == 0:
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(str(SCREENSHOT))
            choice = manifest.loc[pid, "gold_answer"] or cycle[i % len(cycle)]
            key = "t" if (choice == "tie" and i % 2) else keys[choice]  # both tie keys
            ActionChains(browser).send_keys(key).perform()
            clicked[pid] = choice
            progress_is(i + 1)
            if i + 1 == KILL_AFTER:
                server.kill()  # mid-session: every rating the page saw confirmed must be on disk
                assert [(p, c) for _, p, c in stored(db)] == list(clicked.items())
                server.start()
                browser.refresh()
                progress_is(KILL_AFTER)  # the session cookie survives the restart
            if i + 1 == RELOAD_AFTER:
                browser.refresh()
                progress_is(RELOAD_AFTER)
        rows = stored(db)
        assert len(rows) == N_RATED and len({p for _, p, _ in rows}) == N_RATED  # exactly once each
        assert {p: c for _, p, c in rows} == clicked and {r for r, _, _ in rows} == {"lab-rater-1"}

        # A new visit with the same id resumes where the rater left off.
        browser.delete_all_cookies()
        browser.get(server.url + "/")
        browser.find_element(By.ID, "rater_id").send_keys("lab-rater-1", Keys.ENTER)
        progress_is(N_RATED)
        assert shown_pair() not in clicked

        # A second rater, in a fresh session, rates the whole set (so pairs have two raters).
        browser.delete_all_cookies()
        browser.get(server.url + "/")
        browser.find_element(By.ID, "rater_id").send_keys("lab-rater-2", Keys.ENTER)
        progress_is(0)
        second: dict[str, str] = {}
        for i in range(total):
            pid = shown_pair()
            choice = manifest.loc[pid, "gold_answer"] or ["right", "left", "right", "tie"][i % 4]
            ActionChains(browser).send_keys(keys[choice]).perform()
            second[pid] = choice
            progress_is(i + 1)
        wait.until(lambda d: d.execute_script("return document.body.dataset.done === '1'"))
        assert len(stored(db)) == N_RATED + total

        # Path traversal over real HTTP (raw paths, not normalised by a client library).
        cookie = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())
        port = int(server.url.rsplit(":", 1)[1])
        for raw in ("/img/../pairs.csv", "/img/..%2Fpairs.csv", "/img/%2e%2e/%2e%2e/etc/passwd", "/img/../../etc/passwd"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", raw, headers={"Cookie": cookie})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status in (404, 308) and b"pair_id" not in body and b"root:" not in body, (raw, resp.status)
            conn.close()
    finally:
        server.stop()

    # The analysis of exactly these clicked ratings.
    from fcr.human.store import RatingStore

    df = analysis.oriented(RatingStore(db, pair_dir).ratings(), load_pairs(pair_dir))
    test = {p: c for p, c in clicked.items() if manifest.loc[p, "kind"] == "test"}
    wins_a = sum(1 for p, c in test.items() if c != "tie" and c == manifest.loc[p, "a_side"])
    ties = sum(1 for c in test.values() if c == "tie")
    res = analysis.preference(df[df["rater_id"] == "lab-rater-1"])
    assert (res["wins_a"], res["wins_b"], res["ties"]) == (wins_a, len(test) - wins_a - ties, ties)
    att = analysis.attention(df).set_index("rater_id")
    gold_seen = sum(1 for p in clicked if manifest.loc[p, "kind"] == "gold")
    assert att.loc["lab-rater-1", "gold_seen"] == att.loc["lab-rater-1", "gold_passed"] == gold_seen
    assert att.loc["lab-rater-2", "gold_seen"] == int((manifest["kind"] == "gold").sum())
    assert not att["excluded"].any()
    # Two raters: per-rater breakdown, Fleiss' kappa (checked against its formula) and repeat consistency.
    by_rater = analysis.preference_breakdown(df, "rater_id").set_index("rater_id")
    assert by_rater.loc["lab-rater-1", "pairs"] == len(test)
    both = [p for p in test if p in second]
    agreement = analysis.fleiss_agreement(df)
    assert agreement["pairs"] == len(both) and agreement["raters_per_pair"] == 2
    def winner(p, c):
        return "tie" if c == "tie" else ("A" if c == manifest.loc[p, "a_side"] else "B")
    counts = [[[winner(p, clicked[p]), winner(p, second[p])].count(w) for w in ("A", "B", "tie")] for p in both]
    m, n_items = 2, len(counts)
    p_bar = sum((sum(c * c for c in row) - m) / (m * (m - 1)) for row in counts) / n_items
    p_e = sum((sum(row[j] for row in counts) / (n_items * m)) ** 2 for j in range(3))
    assert abs(agreement["kappa"] - (p_bar - p_e) / (1 - p_e)) < 1e-9
    repeats = [p for p in second if manifest.loc[p, "kind"] == "repeat"]
    same = sum(winner(p, second[p]) == winner(manifest.loc[p, "repeat_of"], second[manifest.loc[p, "repeat_of"]])
               for p in repeats)
    cons = analysis.consistency(df[df["rater_id"] == "lab-rater-2"])
    assert (cons["repeat_pairs"], cons["consistent"]) == (len(repeats), same)
    row = analysis.preference_verdict(res, "A", "B")
    assert row["note"].startswith(("A preferred", "B preferred", "not detectable"))
