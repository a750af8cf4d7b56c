"""The performance report of ``profile()`` opened in a real headless Chromium with the network off:
the page loads with no console errors and its Task Stream panel draws our tasks.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; without them the
test skips, except under ``CI=true``, where ``.ci/run`` installs them and their absence fails.
"""

import io
import os
import shutil
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

import dask_pconv as dp
from dask_pconv.profiling import profile

pytestmark = pytest.mark.cluster

# Every request goes to a proxy at a closed local port (loopback included, so nothing bypasses it)
# and no host name resolves: nothing the page or the browser asks for leaves the machine.
_OFFLINE_ARGS = (
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
)
_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
_TIMEOUT = 60  # seconds for the page to load and draw; a broken page fails after this


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must have it (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by the system chromedriver.  Given the driver's path, Selenium
    never runs Selenium Manager (which would download one;
    https://selenium.dev/documentation/selenium_manager)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (it is in the 'test' extra)")
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        _unavailable(
            "chromium or chromedriver is not on PATH (Debian: apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in _ARGS + _OFFLINE_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        driver.set_script_timeout(_TIMEOUT)
        _assert_offline(driver)
        yield driver
    finally:
        driver.quit()


def _assert_offline(driver):
    """The browser reaches nothing outside, and its console log reports the failed request (so
    the log does catch errors); the log is empty afterwards."""
    from selenium.webdriver.support.ui import WebDriverWait

    url = "https://docs.dask.org/"
    driver.get("data:text/html,<title>offline</title>")
    reached = driver.execute_async_script(
        "fetch(arguments[0], {mode: 'no-cors'}).then(() => arguments[1](true), () => arguments[1](false));",
        url,
    )
    assert reached is False, f"{url} answered: the browser is not offline"
    logged = []
    WebDriverWait(driver, _TIMEOUT).until(
        lambda d: logged.extend(d.get_log("browser")) or any(e["message"].startswith(url) for e in logged)
    )
    assert all(e["level"] == "SEVERE" for e in logged if e["message"].startswith(url)), logged


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of conv2d and its VJP on a small chunked array, run on a LocalCluster."""
    path = tmp_path_factory.mktemp("report") / "report.html"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 24, 24))
    w = rng.standard_normal((8, 6, 3, 3))
    # Workers in this process (the report is the same, the cluster starts in a blink), no
    # dashboard, and the scheduler's small HTTP server on any free port rather than 8787
    # (it starts without a dashboard too: https://github.com/dask/distributed/issues/7207).
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        ) as c,
        Client(c),
    ):
        xd = dp.split(x, batch=2, spatial=(2, 2))
        wd = da.from_array(w)
        with profile(path):
            y = dp.conv2d(xd, wd, padding=1)
            gy = da.ones(y.shape, chunks=y.chunks)
            dask.compute(y, *dp.conv2d_vjp(xd, wd, gy, padding=1))
    return path


_IDLE = "return typeof Bokeh != 'undefined' && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle"

# BokehJS's model API: the "Task Stream" tab of the report's Tabs, made the active one, the data
# of its figure's task rectangles, and the longest of our conv2d tasks that has its row to itself
# (a transfer, drawn translucent, may lie over a task in the same row).
_TASK_STREAM = """
const doc = Bokeh.documents[0];
const tabs = [...doc.all_models].find(m => m.type == "Tabs");
const titles = tabs.tabs.map(t => t.title);
const i = titles.indexOf("Task Stream");
if (i < 0) return {titles: titles};
tabs.active = i;
const fig = tabs.tabs[i].child;
const tasks = fig.renderers.find(r => r.data_source && "name" in r.data_source.data);
const d = tasks.data_source.data, n = tasks.data_source.get_length();
const overlap = (i, j) => Math.abs(d.start[i] - d.start[j]) < (d.duration[i] + d.duration[j]) / 2;
const alone = j => [...Array(n).keys()].every(i => i == j || d.y[i] != d.y[j] || !overlap(i, j));
let k = -1;
for (let j = 0; j < n; j++)
  if (d.name[j].startsWith("conv2d-") && (k < 0 || d.duration[j] > d.duration[k]) && alone(j)) k = j;
return {titles: titles, figure: fig.id, renderer: tasks.id, rows: n, names: [...new Set(d.name)],
        task: k < 0 ? null : {name: d.name[k], start: d.start[k], duration: d.duration[k],
                              color: d.color[k]}};
"""

# The figure's view once it has drawn: where its plot frame lies on the page (CSS pixels), and the
# share of the frame's height that one row of task rectangles takes.
_FRAME = """
const [fig, tasks] = [arguments[0], arguments[1]].map(id => Bokeh.documents[0].get_model_by_id(id));
const v = Bokeh.index.find_one(fig);
if (v == null || !v.has_finished()) return null;
const c = v.canvas_view.el.getBoundingClientRect();
const f = v.frame.bbox;
if (c.width == 0 || c.height == 0 || f.width == 0 || f.height == 0) return null;
return {left: c.left + f.left, top: c.top + f.top, width: f.width, height: f.height,
        dpr: window.devicePixelRatio,
        row: tasks.glyph.height.value / (fig.y_range.end - fig.y_range.start)};
"""

# Zoom the time axis (milliseconds since 1970) onto a window centred on the task, as a box zoom
# would (a rectangle's ``start`` is its middle).
_ZOOM = """
const [id, middle, width] = arguments;
Bokeh.documents[0].get_model_by_id(id).x_range.setv({start: middle - width / 2, end: middle + width / 2});
"""
_MIN_WINDOW = 10.0  # ms: a float64 near 1.8e12 ms resolves 2.4e-4 ms; a narrower window blurs


def _painted_fraction(driver, frame, color):
    """The fraction of the plot frame's pixels, on screen, that are exactly ``color``."""
    import matplotlib.colors
    import matplotlib.image

    img = matplotlib.image.imread(io.BytesIO(driver.get_screenshot_as_png()), format="png")[..., :3]
    s = frame["dpr"]
    top, left = round(frame["top"] * s), round(frame["left"] * s)
    crop = img[top : top + round(frame["height"] * s), left : left + round(frame["width"] * s)]  # (H, W, 3)
    rgb = np.array(matplotlib.colors.to_rgb(color))  # "#2E6C8E", "red", ...
    return float((np.abs(crop - rgb).max(axis=-1) < 1.5 / 255).mean())


def check_report(driver, path):
    """Open the report at ``path`` and check it; returns what its Task Stream panel holds."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get_log("browser")  # what earlier pages logged
    driver.get(Path(path).resolve().as_uri())
    wait = WebDriverWait(driver, _TIMEOUT)
    try:
        wait.until(lambda d: d.execute_script(_IDLE))
    except TimeoutException:
        pytest.fail(f"no Bokeh document rendered; console: {driver.get_log('browser')}")
    panel = driver.execute_script(_TASK_STREAM)
    assert "Task Stream" in panel["titles"], panel["titles"]
    assert panel["task"] is not None, f"no conv2d task in the task stream: {panel['names']}"
    frame = wait.until(lambda d: d.execute_script(_FRAME, panel["figure"], panel["renderer"]))

    # Zoomed onto the task, its rectangle covers its row for the task's share of the window.
    task = panel["task"]
    window = max(task["duration"], _MIN_WINDOW)
    driver.execute_script(_ZOOM, panel["figure"], task["start"], window)
    panel["drawn"] = 0.9 * frame["row"] * task["duration"] / window  # 0.9: antialiased edges
    try:  # the repaint takes a frame or two
        WebDriverWait(driver, 10).until(
            lambda d: _painted_fraction(d, frame, task["color"]) >= panel["drawn"]
        )
    except TimeoutException:
        pass
    panel["painted"] = _painted_fraction(driver, frame, task["color"])

    # The page asked for nothing but its own file (profile() drops the remote favicon link of
    # distributed's template, the one request the report would otherwise make).
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in fetched if not u.startswith(("file:", "data:", "blob:"))] == []
    panel["errors"] = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return panel


def test_report_renders_task_stream_offline(browser, report):
    panel = check_report(browser, report)
    assert panel["errors"] == []
    assert {"conv2d-fwd", "conv2d-gx", "conv2d-gw", "conv2d-halo"} <= set(panel["names"]), panel["names"]
    assert panel["rows"] >= 3 * 8  # a rectangle per output chunk of conv2d, grad-x and grad-w at least
    # the rectangles are drawn, not only the data: the task's colour fills its part of the frame
    assert panel["painted"] >= panel["drawn"] > 0, panel
