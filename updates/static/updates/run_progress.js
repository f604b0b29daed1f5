// The run page's live progress: while the run runs, fetch its steps every 2 s and
// put them in place of the old ones. Without JavaScript a <noscript> refresh
// reloads the whole page instead.
(function () {
  "use strict";
  const INTERVAL_MS = 2000;
  const source = document.getElementById("run-progress-source");
  if (!source) return;

  function stop() {
    document.getElementById("run-progress-stale").style.display = "block";
  }

  async function poll() {
    let response;
    try {
      response = await fetch(source.dataset.url, { credentials: "same-origin", redirect: "error" });
    } catch (e) {
      // A network error or a redirect (the session ended: the login page): say so, do not guess.
      stop();
      return;
    }
    if (!response.ok) {
      stop();
      return;
    }
    const html = await response.text();
    const old = document.getElementById("run-progress");
    const template = document.createElement("template");
    template.innerHTML = html.trim();
    const fresh = template.content.getElementById("run-progress");
    if (!old || !fresh) {
      stop();
      return;
    }
    old.replaceWith(fresh);
    if (fresh.dataset.running === "true") {
      setTimeout(poll, INTERVAL_MS);
    } else {
      // Finished: load the page once more, so that the run's fields below are final too.
      window.location.reload();
    }
  }

  setTimeout(poll, INTERVAL_MS);
})();
