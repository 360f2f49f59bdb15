"""The lab rating web app: Flask, served by waitress, SQLite behind it (:mod:`fcr.human.store`).

A rater enters an id (and the access token when the server is exposed), gets a signed session
cookie and rates pair after pair with the keyboard (← left, → right, ↓ or T tie) or the buttons;
the page shows progress and resumes at the first unrated pair after a reload, a restart of the
server or a new visit with the same id. Images are served by name from the pair set's manifest
only: any other name (``../``, absolute paths, encoded separators) is a 404.

Start it with ``python -m fcr.human serve --pairs DIR --db FILE`` (127.0.0.1 by default). Binding
to any other address needs ``--token``: a shared secret the rater types in once.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify, redirect, request, send_file, session, url_for

from fcr.human.pairs import IMAGE_DIR
from fcr.human.store import RatingError, RatingStore, check_rater_id

__all__ = ["create_app", "is_loopback", "serve"]

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }}
 .pair {{ display: flex; gap: 2rem; justify-content: center; margin: 1.5rem 0; }}
 .pair figure {{ margin: 0; text-align: center; }}
 .pair img {{ width: 18rem; height: 18rem; object-fit: contain; image-rendering: pixelated;
             border: 1px solid #bbb; background: #000; }}
 button {{ font-size: 1.1rem; padding: .5rem 1.2rem; margin: 0 .3rem; }}
 #prompt {{ font-size: 1.3rem; text-align: center; }}
 #progress {{ color: #555; text-align: center; }}
 #error {{ color: #b00; text-align: center; min-height: 1.2rem; }}
 .keys {{ color: #555; text-align: center; font-size: .95rem; }}
</style></head><body>{body}</body></html>"""

_START = """<h1>Image preference study</h1>
<p>You will see two images made for the same text. Pick the one that is the better image of that text,
or say they are equally good. There are no right answers except your own judgement.</p>
<form method="post" action="{action}">
 <p><label>Your rater id <input name="rater_id" id="rater_id" required pattern="[A-Za-z0-9_.:-]{{1,64}}"
   autofocus></label></p>
 {token_field}
 <p><button type="submit" id="start">Start</button></p>
 <p id="error">{error}</p>
</form>"""

_RATE = """<p id="progress">…</p>
<p id="prompt"></p>
<div class="pair" id="pair">
 <figure><img id="left" alt="left image"><figcaption>left (←)</figcaption></figure>
 <figure><img id="right" alt="right image"><figcaption>right (→)</figcaption></figure>
</div>
<p style="text-align:center">
 <button id="btn-left" data-choice="left">← Left</button>
 <button id="btn-tie" data-choice="tie">↓ Equal (T)</button>
 <button id="btn-right" data-choice="right">Right →</button>
</p>
<p class="keys">Keys: ← left is better, → right is better, ↓ or T equally good.</p>
<p id="error"></p>
<script>
let current = null, shownAt = 0, busy = false;
const $ = (id) => document.getElementById(id);
async function loadNext() {{
  const r = await fetch("{next_url}", {{credentials: "same-origin"}});
  const data = await r.json();
  if (!r.ok) {{ $("error").textContent = data.error || r.statusText; return; }}
  $("progress").textContent = `${{data.rated}} / ${{data.total}} rated`;
  if (data.pair === null) {{
    current = null;
    $("pair").style.display = "none";
    $("prompt").textContent = "All pairs rated. Thank you!";
    document.body.dataset.done = "1";
    return;
  }}
  current = data.pair;
  $("prompt").textContent = `Which is the better image of: “${{current.prompt}}”?`;
  $("left").src = current.left; $("right").src = current.right;
  document.body.dataset.pair = current.pair_id;
  shownAt = performance.now();
}}
async function rate(choice) {{
  if (!current || busy) return;
  busy = true;
  try {{
    const r = await fetch("{rate_url}", {{method: "POST", credentials: "same-origin",
      headers: {{"Content-Type": "application/json"}},
      body: JSON.stringify({{pair_id: current.pair_id, choice: choice,
                            response_ms: Math.round(performance.now() - shownAt)}})}});
    const data = await r.json();
    if (!r.ok) {{ $("error").textContent = data.error || r.statusText; }} else {{ $("error").textContent = ""; }}
    await loadNext();
  }} catch (e) {{
    $("error").textContent = "The server did not answer; your last rating may not be saved. Reload to resume.";
  }} finally {{ busy = false; }}
}}
document.addEventListener("keydown", (e) => {{
  const key = {{ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", t: "tie", T: "tie"}}[e.key];
  if (key) {{ e.preventDefault(); rate(key); }}
}});
for (const b of document.querySelectorAll("button[data-choice]")) b.addEventListener("click", () => rate(b.dataset.choice));
loadNext();
</script>"""


def _page(title: str, body: str) -> str:
    return _PAGE.format(title=title, body=body)


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def create_app(pair_dir: str | Path, db_path: str | Path, *, token: str | None = None,
               pairs_per_rater: int = 0) -> Flask:
    """The rating app over the pair set ``pair_dir`` and the database ``db_path``; with ``token``
    every rater must give it once (compared in constant time)."""
    pair_dir = Path(pair_dir).resolve()
    store = RatingStore(db_path, pair_dir)
    images = {name: pair_dir / IMAGE_DIR / name for name in store.image_names()}  # the only servable files
    app = Flask(__name__)
    app.config.update(SECRET_KEY=store.session_secret, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", MAX_CONTENT_LENGTH=4096)

    def error(message: str, status: int):
        return jsonify(error=message), status

    def current_rater() -> str | None:
        rater = session.get("rater_id")
        return rater if isinstance(rater, str) else None

    @app.get("/")
    def start():
        token_field = ('<p><label>Access token <input name="token" id="token" type="password" required></label></p>'
                       if token else "")
        message = _escape(request.args.get("error", ""))[:200]
        return _page("Rating study", _START.format(action=url_for("begin"), token_field=token_field, error=message))

    @app.post("/start")
    def begin():
        if token and not hmac.compare_digest(request.form.get("token", "").encode(), token.encode()):
            return redirect(url_for("start", error="wrong access token"))
        try:
            rater_id = check_rater_id(request.form.get("rater_id", ""))
            store.ensure_rater(rater_id, pairs_per_rater=pairs_per_rater)
        except RatingError as exc:
            return redirect(url_for("start", error=str(exc)))
        session.clear()
        session["rater_id"] = rater_id
        return redirect(url_for("rate_page"))

    @app.get("/rate")
    def rate_page():
        if current_rater() is None:
            return redirect(url_for("start"))
        return _page("Rate", _RATE.format(next_url=url_for("api_next"), rate_url=url_for("api_rate")))

    @app.get("/api/next")
    def api_next():
        rater = current_rater()
        if rater is None:
            return error("no rater session: start at /", 401)
        pair = store.next_pair(rater)
        rated, total = store.progress(rater)
        body: dict[str, Any] = {"rated": rated, "total": total, "pair": None}
        if pair is not None:
            body["pair"] = {"pair_id": pair["pair_id"], "prompt": pair["prompt"],
                            "left": url_for("image", name=pair["left_image"]),
                            "right": url_for("image", name=pair["right_image"])}
        return jsonify(body)

    @app.post("/api/rate")
    def api_rate():
        rater = current_rater()
        if rater is None:
            return error("no rater session: start at /", 401)
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict) or set(payload) - {"pair_id", "choice", "response_ms"}:
            return error("expected a JSON object with pair_id, choice and optional response_ms", 400)
        try:
            recorded = store.record(rater, payload.get("pair_id"), payload.get("choice"),
                                    response_ms=payload.get("response_ms"))
        except RatingError as exc:
            return error(str(exc), exc.status)
        rated, total = store.progress(rater)
        return jsonify(status="duplicate" if recorded.duplicate else "recorded", pair_id=recorded.pair_id,
                       choice=recorded.choice, rated=rated, total=total)

    @app.get("/img/<path:name>")
    def image(name: str):
        if current_rater() is None:
            abort(401)
        path = images.get(name)  # exact names of the manifest only: no path is ever built from the request
        if path is None:
            abort(404)
        return send_file(path, mimetype="image/png", max_age=3600)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", **store.summary())

    @app.errorhandler(413)
    def too_large(_exc):
        return error("request too large", 413)

    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(pair_dir: str | Path, db_path: str | Path, *, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None, pairs_per_rater: int = 0, threads: int = 4) -> None:
    """Serve the app with waitress until interrupted. Refuses a non-loopback ``host`` without ``token``."""
    if not is_loopback(host) and not token:
        raise ValueError(f"binding to {host!r} exposes the study beyond this machine: give a shared --token")
    from waitress import serve as waitress_serve

    app = create_app(pair_dir, db_path, token=token, pairs_per_rater=pairs_per_rater)
    print(f"rating app: http://{host}:{port}/  (pairs {pair_dir}, ratings {db_path})", flush=True)
    waitress_serve(app, host=host, port=port, threads=threads)
