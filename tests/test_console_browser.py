"""The console in a real browser (Debian's chromium and chromium-driver, through Selenium), against real
gunicorn and Celery processes and the Locate2u, Storepoint and B2B simulators. Each test saves screenshots
as console-*.png in $L2U_SCREENSHOTS (default: the system temp folder's l2u-console-screenshots), so a test
run leaves the checkout clean; `L2U_SCREENSHOTS=docs/img` refreshes the ones the README shows."""
import os
import tempfile
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.fixtures import KEY, STOP_ID
from tests.helpers import post, settled, wait_for
from tests.payloads import status_change
from tests.tools import require_binary
from workers.store.dead_letters import DeadLetterStore
from workers.store.quarantine import Quarantine

PASSWORD = "browser-console-password"
IMAGES = Path(os.environ.get("L2U_SCREENSHOTS") or Path(tempfile.gettempdir()) / "l2u-console-screenshots")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1280,1000")


@pytest.fixture
def browser(tmp_path):
    chromium = require_binary("chromium", "chromium")
    chromedriver = require_binary("chromedriver", "chromium-driver")
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium-profile'}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def console(stack_settings, start_stack):
    # The public URL only shapes the subscriptions the overview compares (Locate2u never calls it here).
    return start_stack(stack_settings.replace(console_password=PASSWORD, public_url="http://127.0.0.1:9"))


def log_in(driver, base):
    driver.get(f"{base}/console/")
    assert "/console/login" in driver.current_url  # not logged in: sent to the form
    driver.find_element(By.ID, "name").send_keys("admin")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login").click()
    wait_for_heading(driver, lambda heading: heading == "Overview")


def wait_for_heading(driver, expected, timeout=30):
    """Wait for the page after a click: a click returns before the next page has loaded."""
    WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: expected(heading(d)), message=f"heading never matched; page: {driver.current_url}")


def heading(driver):
    """The page's h1 text; None while the page is being replaced under the read (chromedriver then says
    the node "does not belong to the document": a stale element by another name, seen once in CI)."""
    try:
        return driver.find_element(By.TAG_NAME, "h1").text
    except WebDriverException as exc:
        if "does not belong to the document" in (exc.msg or ""):
            return None
        raise


def screenshot(driver, name):
    """The whole page (up to 2,400 px high) as console-NAME.png in IMAGES."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": max(600, min(height, 2400)), "deviceScaleFactor": 1, "mobile": False})
    driver.save_screenshot(str(IMAGES / f"console-{name}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def refresh_until(driver, link_id, text, timeout=90):
    def shown():
        if text in driver.page_source:
            return True
        driver.find_element(By.ID, link_id).click()
        return False
    wait_for(shown, timeout=timeout, interval=1)


def test_find_a_dead_letter_by_stop_id_and_replay_it_after_fixing_the_simulator(console, sims, browser,
                                                                               redis_client):
    faults = sims["storepoint"].app.config["FAULTS"]
    faults.fail_rate(1.0, status=400)  # Storepoint refuses every write
    delivery_id = post(console.url, "stop.status-changed",
                       status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00")).json()["delivery_id"]
    assert wait_for(lambda: settled(redis_client, delivery_id), timeout=90)["status"] == "dead_lettered"

    log_in(browser, console.url)
    browser.find_element(By.LINK_TEXT, "Deliveries").click()
    browser.find_element(By.ID, "stop").send_keys(str(STOP_ID))
    browser.find_element(By.ID, "search").click()
    # The click returns before the results page has loaded (CI once looked at the page before it).
    WebDriverWait(browser, 30).until(lambda driver: f"stop={STOP_ID}" in driver.current_url)
    row = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda driver: driver.find_element(By.XPATH, f"//a[text()='{delivery_id}']/ancestor::tr"))
    assert "dead_lettered" in row.text and str(STOP_ID) in row.text
    screenshot(browser, "deliveries")
    row.find_element(By.LINK_TEXT, delivery_id).click()
    wait_for_heading(browser, lambda heading: heading == f"Delivery {delivery_id}")
    assert "injected fault" in browser.page_source  # the trace says why
    # every step the delivery went through, each sink call with how long it took
    rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in browser.find_elements(By.CSS_SELECTOR, "table.trace tr")[1:]]
    assert [row[2] for row in rows] == ["received", "validated", "enriched", "routed", "dead-lettered", "applied"]
    assert "from=locate2u" in rows[2][3] and "took=" in rows[2][3]
    assert all("took=" in row[3] for row in rows[4:])  # Storepoint's refusal, then B2B's write
    browser.find_element(By.LINK_TEXT, "dead letter").click()
    wait_for_heading(browser, lambda heading: f"{delivery_id}:storepoint" in heading)

    faults.clear()  # Storepoint fixed
    browser.find_element(By.ID, "replay-one").click()
    wait_for_heading(browser, lambda heading: heading == "Replay 1 dead letter?")
    browser.find_element(By.ID, "confirm").click()
    # The POST answers once the replay is queued; the click returns before the next page loads.
    WebDriverWait(browser, 30).until(lambda driver: "/console/replays/" in driver.current_url)
    refresh_until(browser, "refresh", "applied: 1")
    assert f"{delivery_id}:storepoint" in browser.page_source
    screenshot(browser, "replay")
    assert settled(redis_client, delivery_id)["status"] == "applied"
    assert DeadLetterStore(redis_client).list() == []
    assert len(sims["storepoint"].app.config["STATE"].find(lambda loc: f"l2u:{KEY}" in loc["tags"])) == 1


def test_stop_page_shows_drift_after_the_record_changes_in_the_simulator(console, sims, browser, redis_client):
    first = post(console.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    later = post(console.url, "stop.status-changed", status_change(STOP_ID, "Complete", "2022-04-27T06:00:00+00:00"))
    for response in (later, first):
        assert wait_for(lambda: settled(redis_client, response.json()["delivery_id"]), timeout=90)

    log_in(browser, console.url)
    screenshot(browser, "overview")
    browser.find_element(By.NAME, "stop").send_keys(str(STOP_ID))
    browser.find_element(By.XPATH, "//button[text()='Stop']").click()
    wait_for_heading(browser, lambda heading: heading == f"Stop {STOP_ID}")
    page = browser.page_source
    assert page.index("2022-04-27T05:00:00+00:00") < page.index("2022-04-27T06:00:00+00:00")
    assert page.count("in step") == 2 and "drift-" not in page

    state = sims["storepoint"].app.config["STATE"]
    [location] = state.find(lambda loc: f"l2u:{KEY}" in loc["tags"])
    with state.lock:  # someone edits the location in Storepoint's own admin
        state.locations[location["id"]]["name"] = "Renamed in Storepoint by hand"
    browser.refresh()
    [badge] = wait_for(lambda: browser.find_elements(By.ID, "drift-storepoint"))
    assert badge.text == "drift: 1 field(s)"
    drifted = browser.find_element(By.CSS_SELECTOR, "tr.drift")
    assert drifted.text == "name Locate2u Renamed in Storepoint by hand"
    assert drifted.find_element(By.TAG_NAME, "td").value_of_css_property("font-weight") == "600"  # highlighted
    assert browser.page_source.count("in step") == 1  # B2B still holds what we wrote
    screenshot(browser, "stop-drift")


def test_the_stop_page_answers_while_a_sink_hangs_and_says_so(console, sims, browser, redis_client):
    """Its live view reads each sink in the web request. Storepoint hanging, the read waited out the
    sink's full 33 s deadline: past gunicorn's 30 s the web worker (one of the two that take webhooks)
    was killed, and the operator got an error page instead of the stop."""
    response = post(console.url, "stop.status-changed", status_change(STOP_ID, "Arrived", "2022-04-27T05:00:00+00:00"))
    assert wait_for(lambda: settled(redis_client, response.json()["delivery_id"]), timeout=90)
    log_in(browser, console.url)
    sims["storepoint"].app.config["FAULTS"].slow(60, path_prefix="/locations/")  # the live read hangs
    started = time.monotonic()
    browser.get(f"{console.url}/console/stops/{STOP_ID}")
    wait_for_heading(browser, lambda heading: heading == f"Stop {STOP_ID}", timeout=60)
    assert time.monotonic() - started < 20  # the live read's own deadline, well inside gunicorn's 30 s
    page = browser.page_source
    assert "/locations/loc_" in page and "failed: ReadTimeout" in page  # the read timed out, and says so
    assert page.count("in step") == 1  # B2B read as usual


def test_the_overview_answers_while_locate2u_hangs_and_says_so(console, sims, browser):
    """The overview compares the Locate2u subscriptions, in the web request, with the API client's 20 s
    read timeout and its retries: with Locate2u hanging, the landing page outlived gunicorn's 30 s and
    its web worker (one of the two that take webhooks) was killed."""
    log_in(browser, console.url)  # the token is fetched and the subscriptions read while Locate2u answers
    sims["locate2u"].app.config["FAULTS"].slow(60, times=4, path_prefix="/v1/Webhooks")
    started = time.monotonic()
    browser.get(f"{console.url}/console/")
    wait_for_heading(browser, lambda heading: heading == "Overview", timeout=90)
    assert time.monotonic() - started < 20  # a page's own deadline, well inside gunicorn's 30 s
    assert "subscriptions" in browser.page_source and "failed: ReadTimeout" in browser.page_source


def test_purge_all_through_the_confirmation_pages_of_quarantine_and_dead_letters(console, browser, redis_client):
    """What an operator clicks: each list's "Purge all", then the confirmation page's button. (The
    quarantine's confirmation was refused with 400: its form said ``choice``, the action read ``scope``.)"""
    for stop_ref in ("Q1", "Q2"):
        assert post(console.url, "stop.status-changed", {"stopRef": stop_ref}).status_code == 422  # quarantined
    letters = DeadLetterStore(redis_client)
    for number in (1, 2):
        letters.add(f"d-{number}", "storepoint", "refused", stage="deliver")
    log_in(browser, console.url)
    for page, button, heading, done in (
            ("Quarantine", "Purge all 2", "Purge 2 quarantined deliveries?", "Purged 2 quarantined deliveries."),
            ("Dead letters", "Purge all", "Purge 2 dead letters?", "Purged 2 dead letter(s).")):
        browser.find_element(By.LINK_TEXT, page).click()
        WebDriverWait(browser, 30).until(lambda driver: driver.find_elements(
            By.XPATH, f"//button[normalize-space()='{button}']"))[0].click()
        wait_for_heading(browser, lambda text: text == heading)
        browser.find_element(By.ID, "confirm").click()
        WebDriverWait(browser, 30).until(lambda driver: done in driver.page_source, message=browser.page_source)
    assert redis_client.llen(Quarantine.KEY) == 0 and letters.list() == []
