// The notiflow demo page: a post and its comments, a bell with a live unread
// count, and the user's notifications, kept current over one EventSource.
//
// Start-up order matters: the stream opens first and the inbox is read once the
// stream is open, so a notification committed in between is in one or the other
// (items are keyed by id, so being in both is harmless). EventSource reconnects by
// itself and sends Last-Event-ID, which makes the gateway replay what was missed.
// All text from the server goes in through textContent, never as HTML.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const LIVE_LIST_SIZE = 5;
  // How long the page waits before asking an unreachable comments API again.
  const API_RETRY_MS = 5000;
  // A browser opens at most six HTTP/1.1 connections to one host, and each page's
  // stream holds one: a page in a background tab gives its stream up after this
  // long, and asks for the unread count this often instead, so that more tabs
  // than that can open and still reach the gateway. (window.notiflow may set
  // both, as the tests do.)
  const hiddenCloseMs = () => Number(window.notiflow.hiddenCloseMs) || 30000;
  const hiddenPollMs = () => Number(window.notiflow.hiddenPollMs) || 60000;
  const state = {
    api: "",
    devTokens: false,
    username: null,
    // The directory, where the demo's sign-in list gives it.
    users: [],
    // Whether a sign-in got its token and opened the stream.
    signedIn: false,
    token: null,
    source: null,
    items: new Map(),
    unread: 0,
    cursor: null,
    changes: 0,
    // Counts sign-ins: an answer to a request made for an earlier one is dropped.
    session: 0,
    // The comment being sent and its Idempotency-Key, kept until it is stored, so
    // that sending it again after a lost answer stores it once.
    sending: null,
    streamRefused: false,
    // What the notice above the post says, by its subject (see showNotice).
    notices: new Map(),
    // Whether the stream was given up in a background tab, and its timers.
    paused: false,
    hiddenTimer: null,
    pollTimer: null,
    post: null,
    // Thread reads: the one in flight, whether another is due after it, and the
    // comments to mark as new when the thread is next drawn.
    postLoading: null,
    postAgain: false,
    fresh: new Set(),
    linkShown: false,
    retryTimer: null,
    prefs: null,
    prefsUser: null,
    prefsBusy: new Set(),
    // Orders what this page learns of the preferences: each saved change takes a
    // tick, and each read of the whole map a number of its own.
    prefsClock: 0,
    prefsSetAt: {},
    prefsRead: 0,
    // The notice says the comments API could not be reached; its next answer
    // takes the notice down.
    apiUnreachable: false,
    apiRetry: null,
    renderQueued: false,
    // Whether the live stream has been open before: each later opening follows
    // a time without it.
    streamOpened: false,
  };
  window.notiflow = window.notiflow || {};

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.detail) || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  // fetch() rejects, with a TypeError, only when no answer could be read: the
  // server is down or unreachable, or its answer lacks the CORS headers that would
  // let this page's origin read it.
  class UnreachableError extends Error {
    constructor(url, cause) {
      super(`Could not reach ${url} (${cause.message})`);
      this.url = url;
    }
  }

  async function request(url, options = {}) {
    let resp;
    try {
      resp = await fetch(url, options);
    } catch (err) {
      throw err instanceof TypeError ? new UnreachableError(url, err) : err;
    }
    if (state.apiUnreachable && url.startsWith(state.api)) {
      state.apiUnreachable = false;
      showNotice("api");
      if (state.formUnreachable) $("form-error").textContent = "";
      state.formUnreachable = false;
    }
    const body = await resp.json().catch(() => null);
    if (!resp.ok) throw new HttpError(resp.status, body);
    return body;
  }

  async function authed(url, options = {}) {
    const headers = { ...(options.headers || {}), Authorization: `Bearer ${state.token}` };
    try {
      return await request(url, { ...options, headers });
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) forgetSavedToken();
      throw err;
    }
  }

  // A token the services refuse (its user was deleted, or the secret changed) is
  // not asked for again: the next sign-in gets a new one. Only tokens this page
  // got from the development route; one given to the page is the user's to change.
  function forgetSavedToken() {
    if (!state.devTokens) return;
    const saved = JSON.parse(localStorage.getItem("notiflow.session") || "null");
    if (saved && saved.token === state.token) localStorage.removeItem("notiflow.session");
  }

  // ---- who is signed in ------------------------------------------------------

  function claims(token) {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  }

  async function tokenFor(username) {
    const saved = JSON.parse(localStorage.getItem("notiflow.session") || "null");
    const fresh = (t) => claims(t).exp * 1000 > Date.now() + 60_000;
    if (saved && saved.username === username && fresh(saved.token)) return saved.token;
    const issued = await request(`${state.api}/dev/token`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username }),
    });
    localStorage.setItem(
      "notiflow.session", JSON.stringify({ username, token: issued.token }),
    );
    return issued.token;
  }

  // The user a link asks for (?user=NAME) when there is one by that name, else
  // the one signed in last time if still listed, else bob, else the first listed.
  // A name missing from the list would leave the select empty, and the page would
  // ask for a token for nobody; a link's name that is missing is said so.
  function chooseUser(users) {
    const names = users.map((u) => u.username);
    const known = (name) => names.includes(name);
    const fallback = [localStorage.getItem("notiflow.user"), "bob"].find(known) || names[0];
    const asked = new URLSearchParams(location.search).get("user");
    if (!asked || known(asked)) return asked || fallback;
    showNotice("user", `There is no user “${shortened(asked)}”; showing ${fallback}.`);
    return fallback;
  }

  // A database migrated but never seeded: nobody to sign in as, so no token to ask
  // for, and nothing to comment on.
  function sayThereAreNoUsers() {
    showNotice(
      "users",
      "There are no users yet. Add the demo ones with ", code("make seed"),
      " (or ", code("uv run notiflow-seed"), "), then reload this page.",
    );
    setStatus("offline", "no users");
    $("user-select").disabled = true;
    $("comment-submit").disabled = true;
  }

  // The demo's sign-in list; false if there is nobody to sign in as.
  async function loadUsers() {
    const users = await request(`${state.api}/users`);
    state.users = users;
    const select = $("user-select");
    select.replaceChildren(...users.map((u) => new Option(u.display_name, u.username)));
    if (!users.length) {
      sayThereAreNoUsers();
      return false;
    }
    select.value = chooseUser(users);
    return true;
  }

  async function signIn(username) {
    const session = (state.session += 1);
    // Whoever was signed in before, for the push controls to take this browser
    // off their list.
    const signedInBefore = state.token || localStorage.getItem("notiflow.token");
    state.signedIn = false;
    setStatus("connecting");
    // A read state answered for the previous user is not this one's.
    state.changes += 1;
    disconnect();
    if (username !== state.username) forgetPreferences();
    state.items.clear();
    state.cursor = null;
    setUnread(0);
    render();
    if (state.devTokens) {
      const token = await tokenFor(username);
      // A sign-in begun while this one waited for its token decides.
      if (session !== state.session) return;
      state.token = token;
    } else {
      state.token = new URLSearchParams(location.search).get("token")
        || localStorage.getItem("notiflow.token");
      if (!state.token) return setStatus("offline", "no token");
    }
    state.username = username || claims(state.token).name;
    suggestMentions();
    localStorage.setItem("notiflow.user", state.username);
    localStorage.setItem("notiflow.token", state.token);
    window.notiflow.token = state.token;
    window.notiflow.username = state.username;
    window.dispatchEvent(
      new CustomEvent("notiflow:signed-in", { detail: { previous: signedInBefore } }),
    );
    state.signedIn = true;
    if (!state.prefs) loadPreferences().catch(showError);
    connect();
  }

  // What a link says, cut short to fit in a sentence.
  function shortened(text, most = 40) {
    return text.length > most ? `${text.slice(0, most)}…` : text;
  }

  // ---- focus -----------------------------------------------------------------

  // A control disabled while it has the focus hands it to the page's body, and a
  // keyboard user loses their place.
  function lostFocus() {
    return !document.activeElement || document.activeElement === document.body;
  }

  function disableKeepingPlace(control, disabled, refocus) {
    const had = document.activeElement === control;
    control.disabled = disabled;
    if (had && disabled) refocus();
  }

  // ---- notices ---------------------------------------------------------------

  // Several things may need saying at once (a link to a missing post while the
  // stream is refused, say): each has its own line, under its own name, and
  // taking one down leaves the others. Parts are strings or elements; strings go
  // in as text, never as HTML. No parts takes that notice down.
  function showNotice(name, ...parts) {
    if (parts.length) state.notices.set(name, parts);
    else state.notices.delete(name);
    const lines = [...state.notices.values()].map((line) => {
      const el = document.createElement("p");
      el.append(...line);
      return el;
    });
    $("notice").replaceChildren(...lines);
    $("notice").hidden = lines.length === 0;
  }

  function code(text) {
    const el = document.createElement("code");
    el.textContent = text;
    return el;
  }

  // The comments API is another origin: a page opened at an address it does not
  // list in NOTIFLOW_CORS_ORIGINS (localhost for 127.0.0.1, say) can read none of
  // its answers, which looks the same to the page as the service being down.
  function sayApiIsUnreachable() {
    state.apiUnreachable = true;
    showNotice(
      "api",
      "Could not reach the comments API at ", code(state.api),
      ". Either it is not running, or it does not accept this page's address, ",
      code(location.origin), ": the page has to be opened at an address listed in ",
      code("NOTIFLOW_CORS_ORIGINS"), ", and finds the API at ",
      code("NOTIFLOW_API_BASE_URL"), ".",
    );
    if ($("post").getAttribute("aria-busy") === "true") {
      $("post-title").textContent = "The post could not be loaded";
      $("post").setAttribute("aria-busy", "false");
    }
    // Asked again every few seconds: once it answers, the notice goes and the
    // thread shows what was written meanwhile.
    if (!state.apiRetry) {
      state.apiRetry = setTimeout(() => {
        state.apiRetry = null;
        resume().catch(showError);
      }, API_RETRY_MS);
    }
  }

  // What the page could not do while the comments API was away: list the users
  // to sign in as, sign in (a token comes from that API in the demo), show the
  // thread.
  async function resume() {
    if (state.devTokens && !state.users.length && !(await loadUsers())) return;
    // The user the list shows: a switch that could not finish meanwhile is
    // finished now, rather than the page going back to the one before it.
    const shown = state.devTokens ? $("user-select").value : state.username;
    if (!state.signedIn) await signIn(shown);
    await loadPost();
  }

  // ---- the live stream -------------------------------------------------------

  function setStatus(kind, text) {
    const el = $("status");
    el.dataset.state = kind;
    el.textContent = text || kind;
  }

  function disconnect() {
    clearTimeout(state.retryTimer);
    if (state.source) state.source.close();
    state.source = null;
  }

  function connect() {
    disconnect();
    if (document.hidden && state.paused) return;
    setStatus("connecting");
    const source = new EventSource(`/sse?token=${encodeURIComponent(state.token)}`);
    state.source = source;
    source.onopen = () => {
      setStatus("live");
      if (state.streamRefused) {
        state.streamRefused = false;
        showNotice("stream");
      }
      reloadInbox().catch(inboxError);
      // Changes made while the stream was down were announced to nobody here.
      loadPreferences().catch(showError);
      // Nor were comments made meanwhile; and the comments API, back too perhaps,
      // takes down a notice that it could not be reached.
      if (state.streamOpened) loadPost().catch(showError);
      state.streamOpened = true;
    };
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) return setStatus("connecting");
      // Refused (an expired token answers 401, one stream too many 429) or ended
      // for good: start over with a fresh token; the inbox read on open fills any gap.
      setStatus("offline");
      retryStream().catch(inboxError);
    };
    source.addEventListener("notification", (e) => {
      const note = JSON.parse(e.data);
      state.changes += 1;
      const known = state.items.has(note.id);
      state.items.set(note.id, note);
      if (note.unread != null) setUnread(note.unread);
      else if (!known && !note.read_at) setUnread(state.unread + 1);
      renderSoon();
      if (state.post && note.metadata && note.metadata.post_id === state.post.id) {
        loadPost(note.metadata.comment_id).catch(showError);
      }
    });
    source.addEventListener("read", (e) => {
      const change = JSON.parse(e.data);
      state.changes += 1;
      const now = new Date().toISOString();
      for (const id of change.ids) {
        const note = state.items.get(id);
        if (note && !note.read_at) note.read_at = now;
      }
      setUnread(change.unread);
      render();
    });
    source.addEventListener("archived", (e) => {
      const change = JSON.parse(e.data);
      state.changes += 1;
      for (const id of change.ids) state.items.delete(id);
      setUnread(change.unread);
      render();
    });
    source.addEventListener("sync", (e) => {
      setUnread(JSON.parse(e.data).unread);
      reloadInbox().catch(inboxError);
      if (state.prefs) loadPreferences().catch(showError);
    });
    // Another tab, or an email's unsubscribe link, changed the preferences.
    source.addEventListener("preferences", () => loadPreferences().catch(showError));
  }

  // ---- background tabs ---------------------------------------------------------

  function watchVisibility() {
    if (document.hidden) state.hiddenTimer = setTimeout(pauseStream, hiddenCloseMs());
    document.addEventListener("visibilitychange", () => {
      clearTimeout(state.hiddenTimer);
      state.hiddenTimer = null;
      if (document.hidden) {
        state.hiddenTimer = setTimeout(pauseStream, hiddenCloseMs());
      } else if (state.paused) {
        resumeStream();
      }
    });
  }

  function pauseStream() {
    if (!state.source || !document.hidden) return;
    state.paused = true;
    disconnect();
    setStatus("offline", "paused");
    state.pollTimer = setInterval(() => {
      authed("/inbox/unread-count").then((r) => setUnread(r.unread)).catch(() => {});
    }, hiddenPollMs());
  }

  // Opened again, the stream reads the inbox, the preferences and the thread,
  // as after any reconnection.
  function resumeStream() {
    state.paused = false;
    clearInterval(state.pollTimer);
    state.pollTimer = null;
    if (state.signedIn) connect();
  }

  // EventSource does not say why it was refused. A user with as many streams open
  // as the server allows (other tabs, other devices) is answered 429 until one
  // closes: the page says so, shows the inbox as it is, and asks again when the
  // answer's Retry-After says to.
  async function retryStream() {
    const probe = await fetch(`/sse?token=${encodeURIComponent(state.token)}`, {
      method: "HEAD",
    }).catch(() => null);
    if (!probe || probe.status !== 429) {
      if (probe && probe.status === 401) forgetSavedToken();
      state.retryTimer = setTimeout(() => signIn(state.username).catch(showError), 3000);
      return;
    }
    // The token is good: the same one is tried again, and the list stays.
    const wait = Number(probe.headers.get("Retry-After")) || 10;
    state.streamRefused = true;
    setStatus("offline", "paused");
    showNotice(
      "stream",
      "Live updates are paused: this user already has as many pages open as the ",
      "server allows. Close one of them; this page tries again every ",
      String(wait), " s.",
    );
    state.retryTimer = setTimeout(connect, wait * 1000);
    await loadInbox();
  }

  // ---- the inbox -------------------------------------------------------------

  async function loadInbox(cursor) {
    const before = state.changes;
    const session = state.session;
    const query = new URLSearchParams({ limit: "20" });
    if (cursor) query.set("cursor", cursor);
    const page = await authed(`/inbox?${query}`);
    if (session !== state.session) return;
    inboxError();
    for (const note of page.items) state.items.set(note.id, note);
    if (cursor || state.cursor === null) state.cursor = page.next_cursor;
    // A live change that landed while the page was in flight is newer than the
    // page's count; ask again rather than step back.
    await settleUnread(before, page.unread);
    render();
  }

  // After a gap in the stream (a first connection, a reconnection, a replica that
  // missed changes): what was archived or read meanwhile is known only to the
  // server, so the list starts again from its first page instead of adding to
  // what it shows. A live change landing while the page is in flight may be newer
  // than the page; then the page is asked for again.
  async function reloadInbox() {
    const session = state.session;
    for (let tries = 0; tries < 3; tries += 1) {
      const before = state.changes;
      const page = await authed("/inbox?limit=20");
      if (session !== state.session) return;
      inboxError();
      if (state.changes !== before) continue;
      state.items = new Map(page.items.map((note) => [note.id, note]));
      state.cursor = page.next_cursor;
      setUnread(page.unread);
      render();
      return;
    }
    await loadInbox();
  }

  // The count an answer to a change of read state gives is the server's as of that
  // change; a live change that arrived before the answer is newer, and then the
  // count is asked for again rather than stepped back.
  async function settleUnread(before, unread) {
    if (state.changes === before) return setUnread(unread);
    const session = state.session;
    const count = (await authed("/inbox/unread-count")).unread;
    if (session === state.session) setUnread(count);
  }

  async function markRead(id) {
    const note = state.items.get(id);
    if (!note || note.read_at) return;
    note.read_at = new Date().toISOString();
    render();
    const before = state.changes;
    let result;
    try {
      result = await authed(`/inbox/${id}/read`, { method: "POST" });
    } catch (err) {
      // Not read after all: the item can be clicked again.
      note.read_at = null;
      render();
      throw err;
    }
    inboxError();
    await settleUnread(before, result.unread);
  }

  // Only what the server marked: a notification that arrived while the request
  // was in flight is still unread, and so is every one the page has not loaded.
  async function markAllRead() {
    const before = state.changes;
    const result = await authed("/inbox/read-all", { method: "POST" });
    inboxError();
    const now = new Date().toISOString();
    for (const id of result.marked) {
      const note = state.items.get(id);
      if (note && !note.read_at) note.read_at = now;
    }
    await settleUnread(before, result.unread);
    render();
  }

  function setUnread(count) {
    state.unread = Math.max(0, count);
    const badge = $("unread-count");
    badge.textContent = state.unread > 99 ? "99+" : String(state.unread);
    badge.dataset.count = String(state.unread);
    $("bell").setAttribute("aria-label", `Notifications, ${state.unread} unread`);
    document.title = state.unread ? `(${state.unread}) notiflow` : "notiflow";
  }

  function time(iso) {
    if (!iso) return "";
    return new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  }

  function noteItem(note) {
    const li = document.createElement("li");
    li.className = note.read_at ? "note" : "note unread";
    li.dataset.id = String(note.id);
    li.tabIndex = 0;
    const body = document.createElement("div");
    const title = document.createElement("div");
    title.className = "note-title";
    title.textContent = note.title;
    const text = document.createElement("div");
    text.className = "note-text";
    // Blank lines would take the two lines the preview has.
    text.textContent = note.message.replace(/\n\s*\n+/g, "\n");
    const when = document.createElement("div");
    when.className = "note-time";
    when.textContent = time(note.created_at);
    body.append(title, text, when);
    li.append(body);
    const open = () => {
      markRead(note.id).catch(inboxError);
      const target = note.metadata && note.metadata.comment_id;
      const el = target && document.getElementById(`comment-${target}`);
      if (el) reveal(el, "smooth");
    };
    li.addEventListener("click", open);
    li.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" && e.key !== " ") return;
      e.preventDefault();
      open();
    });
    return li;
  }

  // A burst of notifications is drawn once per frame, not once per notification.
  function renderSoon() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      render();
    });
  }

  function render() {
    const notes = [...state.items.values()].sort((a, b) => b.seq - a.seq);
    // A redraw replaces every item: the one that had focus gets it back.
    const focused = document.activeElement;
    const list = focused && focused.closest ? focused.closest(".notes") : null;
    const keep = list && focused.dataset.id;
    $("notifications").replaceChildren(...notes.map(noteItem));
    $("live-notes").replaceChildren(...notes.slice(0, LIVE_LIST_SIZE).map(noteItem));
    if (keep) {
      const again = list.querySelector(`[data-id="${keep}"]`);
      if (again) again.focus();
    }
    $("empty").hidden = notes.length > 0;
    $("more").hidden = !state.cursor;
    disableKeepingPlace($("mark-all"), state.unread === 0, () => {
      const first = $("notifications").querySelector("[data-id]");
      (first || $("bell")).focus();
    });
  }

  // ---- how the user wants to be notified -------------------------------------

  // The boxes show what GET /preferences stored, read once per signed-in user and
  // again whenever the stream says they changed elsewhere (another tab, an email's
  // unsubscribe link) or may have (a "sync" after the gateway lost its feed). Each
  // change is sent alone, with only its key, and only that key is taken from the
  // answer: the whole map it carries can be older than the answer to a change of
  // another box that arrived first. For the same reason a read of the whole map
  // keeps what this page saved while the read was in flight, and only the latest
  // read counts. A box takes no click while its change is in flight (marked
  // aria-disabled, not disabled, so that it keeps the keyboard's focus), and all
  // are disabled until the map is known. Answers meant for a user who is no longer signed in are
  // dropped.

  function preferenceBoxes() {
    return [...$("prefs").querySelectorAll("input[type=checkbox]")];
  }

  function renderPreferences() {
    for (const box of preferenceBoxes()) {
      if (state.prefsBusy.has(box.name)) continue;
      box.removeAttribute("aria-disabled");
      box.disabled = !state.prefs;
      box.checked = Boolean(state.prefs && state.prefs[box.name]);
    }
  }

  function forgetPreferences() {
    state.prefs = null;
    state.prefsUser = null;
    state.prefsSetAt = {};
    $("prefs-error").textContent = "";
    renderPreferences();
  }

  async function loadPreferences() {
    const user = (state.prefsUser = state.username);
    const read = ++state.prefsRead;
    const since = state.prefsClock;
    try {
      const stored = await authed("/preferences");
      if (user !== state.prefsUser || read !== state.prefsRead) return;
      for (const [key, at] of Object.entries(state.prefsSetAt)) {
        if (at > since && state.prefs) stored[key] = state.prefs[key];
      }
      state.prefs = stored;
      $("prefs-error").textContent = "";
      renderPreferences();
    } catch (err) {
      if (user !== state.prefsUser) return;
      $("prefs-error").textContent = `Could not load your settings: ${err.message}`;
    }
  }

  async function changePreference(box) {
    const key = box.name;
    const user = state.prefsUser;
    const name = box.closest("label").textContent.trim();
    state.prefsBusy.add(key);
    box.setAttribute("aria-disabled", "true");
    $("prefs-error").textContent = "";
    try {
      const stored = await authed("/preferences", {
        method: "PATCH",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ [key]: box.checked }),
      });
      if (user === state.prefsUser && state.prefs) {
        state.prefs[key] = stored[key];
        state.prefsSetAt[key] = ++state.prefsClock;
      }
    } catch (err) {
      // The box goes back to what is stored (renderPreferences, below).
      if (user === state.prefsUser) {
        $("prefs-error").textContent = `Could not save “${name}”: ${err.message}`;
      }
    } finally {
      state.prefsBusy.delete(key);
      renderPreferences();
    }
  }

  // ---- the post and its comments ---------------------------------------------

  // Notifications about the thread on screen can come by the hundred, and each
  // read returns the whole thread: while one read is in flight, those asked for
  // meanwhile make one more read after it, which shows them all. Each caller's
  // promise settles once the thread shows what it asked for.
  function loadPost(highlight) {
    if (highlight != null) state.fresh.add(highlight);
    if (state.postLoading) {
      state.postAgain = true;
      return state.postLoading;
    }
    state.postLoading = (async () => {
      try {
        do {
          state.postAgain = false;
          await readPost();
        } while (state.postAgain);
      } finally {
        state.postLoading = null;
      }
    })();
    return state.postLoading;
  }

  async function readPost() {
    if (!state.post) state.post = await choosePost();
    if (!state.post) {
      $("post-title").textContent = "No posts yet";
      $("post").setAttribute("aria-busy", "false");
      return;
    }
    const post = await request(`${state.api}/posts/${state.post.id}`);
    $("post-title").textContent = post.title;
    $("post-meta").textContent = `${post.author.display_name} · ${time(post.created_at)}`;
    $("post-body").textContent = post.body;
    $("post").setAttribute("aria-busy", "false");
    $("comments-heading").textContent = `Comments (${post.comments.length})`;
    const fresh = state.fresh;
    state.fresh = new Set();
    $("comments").replaceChildren(...post.comments.map((c) => commentItem(c, fresh.has(c.id))));
    showLinkedComment();
  }

  // Every notification links to its comment (#comment-N). The comments are drawn
  // after the page has loaded, too late for the browser's own jump, so the page
  // makes it once they are there, the first time only.
  function showLinkedComment() {
    if (state.linkShown) return;
    state.linkShown = true;
    const wanted = /^#comment-(\d+)$/.exec(location.hash);
    const el = wanted && document.getElementById(`comment-${wanted[1]}`);
    if (!el) return;
    el.classList.add("fresh");
    reveal(el, "auto");
  }

  // Centred, or from its top if it is taller than the window.
  function reveal(el, behavior) {
    const block = el.offsetHeight > window.innerHeight ? "start" : "center";
    el.scrollIntoView({ behavior, block });
  }

  // The post a link names (?post=N, as every notification's link does), asked for
  // by its id: the list holds only the newest posts. Without one, or if it is
  // gone, the demo's welcome post or the newest; a link to a post that is gone
  // says so above the one shown instead.
  async function choosePost() {
    // An empty ?post= names no post: the page shows its usual one.
    const asked = new URLSearchParams(location.search).get("post") || null;
    const wanted = Number(asked);
    if (asked !== null && Number.isSafeInteger(wanted) && wanted > 0) {
      try {
        return await request(`${state.api}/posts/${wanted}`);
      } catch (err) {
        if (!(err instanceof HttpError && err.status === 404)) throw err;
      }
    }
    const posts = await request(`${state.api}/posts`);
    const shown = posts.find((p) => p.author.username === "alice") || posts[0];
    if (asked !== null) {
      showNotice(
        "post",
        `The link asks for post ${shortened(asked)}, which does not exist`,
        shown ? `; this is “${shown.title}” instead.` : ".",
      );
    }
    return shown;
  }

  // The form's hint names people the signed-in user might mention: others, when
  // the directory is known (the demo's sign-in list), or how to write a mention.
  function suggestMentions() {
    const others = state.users
      .map((u) => u.username)
      .filter((name) => name !== state.username)
      .slice(0, 3)
      .map((name) => `@${name}`);
    const hint = others.length > 1
      ? `${others.slice(0, -1).join(", ")} or ${others[others.length - 1]}`
      : others[0] || "@ and their user name";
    $("comment-hint").textContent = `Add a comment — mention someone with ${hint}`;
  }

  function closePanel() {
    const panel = $("panel");
    if (panel.hidden) return;
    const focusWasInside = panel.contains(document.activeElement);
    panel.hidden = true;
    $("bell").setAttribute("aria-expanded", "false");
    if (focusWasInside) $("bell").focus();
  }

  function commentItem(comment, fresh) {
    const li = document.createElement("li");
    li.className = fresh ? "comment fresh" : "comment";
    li.id = `comment-${comment.id}`;
    const author = document.createElement("span");
    author.className = "comment-author";
    author.textContent = comment.author.display_name;
    const when = document.createElement("span");
    when.className = "comment-time";
    when.textContent = time(comment.created_at);
    const body = document.createElement("p");
    body.className = "comment-body";
    body.textContent = comment.body;
    li.append(author, when, body);
    return li;
  }

  async function submitComment(event) {
    event.preventDefault();
    const field = $("comment-body");
    const button = $("comment-submit");
    $("form-error").textContent = "";
    // Until a sign-in has finished, the token at hand may be another user's,
    // and the thread may not be known yet.
    if (!state.signedIn || !state.post) {
      $("form-error").textContent = "Not signed in yet: the page signs in, and shows "
        + "the thread, as soon as the comments API answers. Your text is kept.";
      return;
    }
    const typing = [field, button].includes(document.activeElement);
    button.disabled = true;
    try {
      const comment = { user: state.username, post: state.post.id, body: field.value };
      const last = state.sending;
      if (!last || last.user !== comment.user || last.post !== comment.post
          || last.body !== comment.body) {
        state.sending = { ...comment, key: crypto.randomUUID() };
      }
      const sending = state.sending;
      const created = await authed(`${state.api}/comments`, {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": sending.key },
        body: JSON.stringify({ post_id: comment.post, body: comment.body }),
      });
      if (state.sending === sending) state.sending = null;
      field.value = "";
      await loadPost(created.id);
    } catch (err) {
      $("form-error").textContent = err.message;
      if (err instanceof UnreachableError) {
        // Said above the post too, and asked again until it answers; this
        // line goes when it does, the text staying for another try.
        state.formUnreachable = true;
        sayApiIsUnreachable();
      }
    } finally {
      button.disabled = false;
      // Disabled meanwhile, the button gave the focus up to the page's body.
      if (typing && lostFocus()) field.focus();
    }
  }

  // What went wrong with the inbox is said beside it, not under the comment form,
  // and taken down by its next answer; without an error, only that.
  function inboxError(err) {
    const el = $("inbox-error");
    if (!err) {
      el.textContent = "";
      el.hidden = true;
      return;
    }
    console.error(err);
    el.textContent = err.message || String(err);
    el.hidden = false;
  }

  function showError(err) {
    console.error(err);
    if (err instanceof UnreachableError && state.api && err.url.startsWith(state.api)) {
      return sayApiIsUnreachable();
    }
    $("form-error").textContent = err.message || String(err);
  }

  // ---- wiring ----------------------------------------------------------------

  // The controls get their handlers before anything is fetched: a page that could
  // not reach an API must not fall back on the browser's own form submission.
  function wireControls() {
    $("bell").addEventListener("click", () => {
      const panel = $("panel");
      // Where the panel goes on a narrow screen, just below the bell.
      const below = $("bell").getBoundingClientRect().bottom + 8;
      panel.style.setProperty("--panel-top", `${Math.round(below)}px`);
      panel.hidden = !panel.hidden;
      $("bell").setAttribute("aria-expanded", String(!panel.hidden));
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") closePanel();
    });
    document.addEventListener("click", (e) => {
      // The path as it was when the click happened: a notification clicked is
      // redrawn at once, and is no longer inside the panel by now.
      if (!e.composedPath().some((el) => el.classList && el.classList.contains("bell-wrap"))) {
        closePanel();
      }
    });
    $("mark-all").addEventListener("click", () => markAllRead().catch(inboxError));
    $("more").addEventListener("click", () => loadInbox(state.cursor).catch(inboxError));
    $("comment-form").addEventListener("submit", submitComment);
    // Ctrl+Enter (Cmd+Enter on a Mac) posts from the text box, where Enter alone
    // starts a new line.
    $("comment-body").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        $("comment-form").requestSubmit();
      }
    });
    $("prefs").addEventListener("change", (e) => changePreference(e.target).catch(showError));
    // A box whose change is in flight stays as asked until it is answered.
    $("prefs").addEventListener("click", (e) => {
      if (e.target.type === "checkbox" && state.prefsBusy.has(e.target.name)) {
        e.preventDefault();
      }
    });
    $("prefs").addEventListener("submit", (e) => e.preventDefault());
  }

  async function start() {
    wireControls();
    watchVisibility();
    const config = await request("/config.json");
    state.api = config.api_base_url;
    state.devTokens = config.dev_tokens;
    const select = $("user-select");
    if (state.devTokens) {
      select.addEventListener("change", () => {
        // What was said of the user the link named, or of the last one's stream.
        showNotice("user");
        showNotice("stream");
        signIn(select.value).catch(showError);
      });
    } else {
      select.closest(".who").hidden = true;
    }
    const hasUsers = !state.devTokens || (await loadUsers());
    await Promise.all([hasUsers && signIn(select.value), loadPost()]);
  }

  start().catch(showError);
})();
