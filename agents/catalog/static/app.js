// pilotfish catalog UI: plain ES module, no build step.
// Every value from the API (which came from etcd) is inserted as text
// (textContent / text nodes), never as HTML.

const state = {
  prefix: null,
  etcdHost: "",
  revision: 0,
  services: new Map(), // name -> summary
  quarantined: 0,
  picked: new Set(),
  filters: { name: "", tag: "", host: "" },
  source: null,
  detail: null, // the service shown on its own page
  hostsTimer: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function api(path, params = {}) {
  const query = new URLSearchParams({ prefix: state.prefix, ...params });
  return fetch(`/api/v1/${path}?${query}`).then(async (response) => {
    const body = await response.json();
    return { status: response.status, body };
  });
}

function serviceHref(name) {
  return `#/services/${encodeURIComponent(name)}`;
}

function tags(list) {
  return list.map((tag) => el("span", { class: "tag" }, tag));
}

function setRevision(revision) {
  state.revision = revision;
  $("revision").textContent = `revision ${revision}`;
  document.body.dataset.revision = String(revision);
}

function setQuarantined(count) {
  state.quarantined = count;
  $("quarantined-count").textContent = String(count);
}

// --- data ------------------------------------------------------------------

async function loadServices() {
  const { body } = await api("services");
  state.services = new Map(body.services.map((s) => [s.name, s]));
  setRevision(body.revision);
  setQuarantined(body.quarantined);
  return body.revision;
}

function connect(since) {
  if (state.source) state.source.close();
  const query = new URLSearchParams({ prefix: state.prefix, since: String(since) });
  const source = new EventSource(`/api/v1/events?${query}`);
  state.source = source;
  const live = $("live");
  source.onopen = () => { live.dataset.state = "live"; live.textContent = "live"; };
  source.onerror = () => { live.dataset.state = "connecting"; live.textContent = "reconnecting"; };
  source.addEventListener("hello", (event) => {
    const data = JSON.parse(event.data);
    setQuarantined(data.quarantined);
  });
  source.addEventListener("change", (event) => applyChange(JSON.parse(event.data)));
  source.addEventListener("reset", async (event) => {
    const data = JSON.parse(event.data);
    await loadServices();
    setRevision(Math.max(state.revision, data.revision));
    render();
  });
}

function applyChange(data) {
  const names = Object.keys(data.services);
  for (const name of names) {
    const summary = data.services[name];
    if (summary === null) state.services.delete(name);
    else state.services.set(name, summary);
  }
  setRevision(data.revision);
  const quarantineMoved = data.quarantined !== state.quarantined;
  setQuarantined(data.quarantined);
  const route = currentRoute();
  if (route.page === "services") scheduleRender();
  else if (route.page === "service" && names.includes(route.name)) render();
  else if (route.page === "hosts") scheduleHosts();
  else if (route.page === "quarantined" && quarantineMoved) render();
  renderPick();
}

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function scheduleHosts() {
  if (state.hostsTimer) return;
  state.hostsTimer = setTimeout(() => { state.hostsTimer = null; render(); }, 500);
}

// --- pages -----------------------------------------------------------------

function currentRoute() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [page, ...rest] = hash.split("/");
  if (page === "services" && rest.length) {
    try {
      return { page: "service", name: decodeURIComponent(rest.join("/")) };
    } catch {
      return { page: "services" }; // a malformed address: back to the list
    }
  }
  if (["hosts", "consumers", "quarantined"].includes(page)) return { page };
  return { page: "services" };
}

function matches(summary) {
  const { name, tag, host } = state.filters;
  if (name && !summary.name.toLowerCase().includes(name.toLowerCase())) return false;
  if (tag && !summary.tags.some((t) => t.toLowerCase().includes(tag.toLowerCase()))) return false;
  if (host && !summary.hosts.some((h) => h.toLowerCase().includes(host.toLowerCase()))) return false;
  return true;
}

function searchBox() {
  const box = el("div", { class: "search" });
  for (const [key, label] of [["name", "Search by name"], ["tag", "Tag"], ["host", "Host"]]) {
    const input = el("input", { type: "search", id: `search-${key}`, placeholder: label, "aria-label": label });
    input.value = state.filters[key];
    input.addEventListener("input", () => { state.filters[key] = input.value; renderServiceRows(false); });
    box.append(input);
  }
  return box;
}

function renderServices(view) {
  view.replaceChildren(
    el("h1", {}, "Services"),
    searchBox(),
    el("div", { class: "counts", id: "counts" }),
    el("table", { id: "services" },
      el("thead", {}, el("tr", {},
        ["Pick", "Service", "Mode", "Port", "Serving", "Draining", "Hosts", "Tags"].map((h) => el("th", {}, h)))),
      el("tbody", { id: "service-rows" })),
    el("p", { id: "rows-end", class: "more", hidden: "" }),
  );
  renderServiceRows(false);
}

// Rows are built as the list scrolls into view: a page of them first, the
// next page when the end of the table comes near. A catalog of thousands of
// services shows its first screen at once and never blocks the page.
const PAGE_ROWS = 100;
let rowsShown = PAGE_ROWS;
let moreRows = null; // IntersectionObserver of the table's end

function serviceRow(s) {
  const box = el("input", { type: "checkbox", class: "pick", "aria-label": `pick ${s.name}` });
  box.checked = state.picked.has(s.name);
  box.addEventListener("change", () => {
    if (box.checked) state.picked.add(s.name); else state.picked.delete(s.name);
    renderPick();
  });
  return el("tr", { "data-service": s.name },
    el("td", {}, box),
    el("td", {}, el("a", { href: serviceHref(s.name) }, s.name)),
    el("td", {}, s.mode),
    el("td", { class: "num" }, s.port),
    el("td", { class: "num serving" }, s.serving),
    el("td", { class: "num draining" }, s.draining),
    el("td", {}, s.hosts.join(", ")),
    el("td", {}, tags(s.tags)),
  );
}

function renderServiceRows(keepScroll = true) {
  const body = $("service-rows");
  if (!body) return;
  const all = [...state.services.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const shown = all.filter(matches);
  const instances = all.reduce((sum, s) => sum + s.instances, 0);
  $("counts").textContent =
    `${shown.length} of ${all.length} services · ${instances} instances`;
  if (!keepScroll) rowsShown = PAGE_ROWS;
  body.replaceChildren(...shown.slice(0, rowsShown).map(serviceRow));
  const end = $("rows-end");
  end.hidden = shown.length <= rowsShown;
  end.textContent = `${shown.length - rowsShown} more below`;
  if (moreRows) moreRows.disconnect();
  moreRows = new IntersectionObserver((entries) => {
    if (!entries.some((entry) => entry.isIntersecting) || end.hidden) return;
    rowsShown += PAGE_ROWS;
    renderServiceRows();
  }, { rootMargin: "400px" });
  moreRows.observe(end);
}

async function renderService(view, name) {
  const { status, body } = await api(`services/${encodeURIComponent(name)}`);
  if (currentRoute().name !== name) return;
  if (status === 404) {
    view.replaceChildren(el("h1", {}, name), el("p", { class: "muted", id: "gone" }, "No instance is registered (any more)."));
    return;
  }
  const s = body.service;
  view.replaceChildren(
    el("h1", {}, s.name),
    el("p", { class: "counts" },
      `${s.mode} · consumer port ${s.port} · ${s.serving} serving · ${s.draining} draining · hosts ${s.hosts.join(", ")}`),
    el("table", { id: "instances" },
      el("thead", {}, el("tr", {},
        ["Host", "Address", "Container", "Image", "Tags", "Attributes", "Weight", "State", "Registered"].map((h) => el("th", {}, h)))),
      el("tbody", {}, body.instances.map((i) => el("tr", { "data-container": i.container_id, "data-state": i.state },
        el("td", {}, i.host_id),
        el("td", {}, `${i.address}:${i.port}`),
        el("td", {}, el("code", {}, i.container_id.slice(0, 12)), i.container_name ? ` ${i.container_name}` : ""),
        el("td", {}, i.image),
        el("td", {}, tags(i.tags)),
        el("td", {}, Object.entries(i.attributes).map(([k, v]) => el("div", {}, `${k}=${v}`))),
        el("td", { class: "num" }, i.weight),
        el("td", { class: `state-${i.state}` }, i.state),
        el("td", {}, new Date(i.registered_at).toLocaleString()),
      )))),
  );
}

async function renderHosts(view) {
  const { body } = await api("hosts");
  if (currentRoute().page !== "hosts") return;
  view.replaceChildren(
    el("h1", {}, "Hosts"),
    el("table", { id: "hosts" },
      el("thead", {}, el("tr", {}, ["Host", "Containers", "Instances", "Services", "Lease", "TTL left", "Registrar"].map((h) => el("th", {}, h)))),
      el("tbody", {}, body.hosts.map((h) => el("tr", { "data-host": h.host_id },
        el("td", {}, h.host_id),
        el("td", { class: "num" }, h.containers),
        el("td", { class: "num" }, h.instances),
        el("td", {}, h.services.join(", ")),
        el("td", { class: h.lease_alive ? "state-up" : "state-draining" }, h.claimed ? (h.lease_alive ? "alive" : "expired") : "no claim"),
        el("td", { class: "num" }, h.ttl_left === null ? "" : `${h.ttl_left} s`),
        el("td", {}, h.holder ?? ""),
      )))),
  );
}

async function renderConsumers(view) {
  const { body } = await api("consumers");
  if (currentRoute().page !== "consumers") return;
  const content = body.consumers.length
    ? el("table", { id: "consumers" },
        el("thead", {}, el("tr", {}, ["Discoverer", "Applied revision", "Behind", "Services", "Draining", "Sessions", "Version"].map((h) => el("th", {}, h)))),
        el("tbody", {}, body.consumers.map((c) => el("tr", {},
          el("td", {}, c.id), el("td", { class: "num" }, c.applied_revision), el("td", { class: "num" }, c.behind),
          el("td", {}, c.serves_all ? `all (${c.services.length} now)` : c.services.join(", ")),
          el("td", { class: "num" }, c.draining), el("td", { class: "num" }, c.sessions), el("td", {}, c.version)))))
    : el("p", { class: "muted", id: "no-consumers" }, "No discoverer publishes its status in this environment yet.");
  view.replaceChildren(el("h1", {}, "Consumers"), content);
}

async function renderQuarantined(view) {
  const { body } = await api("quarantined");
  if (currentRoute().page !== "quarantined") return;
  view.replaceChildren(
    el("h1", {}, "Quarantined entries"),
    el("p", { class: "muted" }, "etcd entries that do not follow the schema: shown, never served."),
    el("table", { id: "quarantined" },
      el("thead", {}, el("tr", {}, el("th", {}, "Key"), el("th", {}, "Reason"))),
      el("tbody", {}, body.entries.map((e) => el("tr", {}, el("td", {}, el("code", {}, e.key)), el("td", { class: "reason" }, e.reason))))),
  );
  if (body.total > body.entries.length) {
    view.append(el("p", { class: "more" }, `and ${body.total - body.entries.length} more`));
  }
}

async function render() {
  const route = currentRoute();
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === route.page || (route.page === "service" && link.dataset.nav === "services"));
  }
  const view = $("view");
  if (route.page === "services") {
    if ($("service-rows")) renderServiceRows(); else renderServices(view);
  } else if (route.page === "service") await renderService(view, route.name);
  else if (route.page === "hosts") await renderHosts(view);
  else if (route.page === "consumers") await renderConsumers(view);
  else if (route.page === "quarantined") await renderQuarantined(view);
  document.body.dataset.rendered = route.page;
}

// --- pick services -------------------------------------------------------------

function renderPick() {
  const aside = $("pick");
  const names = [...state.picked].sort();
  aside.hidden = names.length === 0;
  if (!names.length) return;
  $("pick-count").textContent = `(${names.length})`;
  const list = names.join(",");
  $("pick-command").textContent =
    `pilotfish discover --etcd-host ${state.etcdHost} --prefix ${state.prefix} --services ${list}`;
  $("pick-ports").textContent = names.map((name) => {
    const s = state.services.get(name);
    return s ? `curl 127.0.0.1:${s.port}    # ${name} (${s.mode})` : `# ${name}: no instance registered now`;
  }).join("\n");
  $("pick-compose").textContent = [
    "  discoverer:",
    "    image: pilotfish-discoverer:latest",
    "    network_mode: host",
    "    environment:",
    `      ETCD_HOST: ${state.etcdHost}`,
    `      PILOTFISH_PREFIX: ${state.prefix}`,
    `      PILOTFISH_SERVICES: ${list}`,
    "    restart: unless-stopped",
  ].join("\n");
}

// --- start -----------------------------------------------------------------------

async function switchEnvironment(prefix) {
  state.prefix = prefix;
  state.picked.clear();
  renderPick();
  const url = new URL(location.href);
  url.searchParams.set("prefix", prefix);
  history.replaceState(null, "", url);
  const revision = await loadServices();
  connect(revision);
  $("view").replaceChildren();
  await render();
}

async function start() {
  const response = await fetch("/api/v1/environments");
  const envs = await response.json();
  state.etcdHost = envs.etcd_host;
  const select = $("env");
  for (const env of envs.environments) select.append(el("option", { value: env.prefix }, env.prefix));
  const wanted = new URL(location.href).searchParams.get("prefix");
  const first = envs.environments.some((e) => e.prefix === wanted) ? wanted : envs.environments[0].prefix;
  select.value = first;
  select.addEventListener("change", () => switchEnvironment(select.value));
  $("pick-clear").addEventListener("click", () => {
    state.picked.clear();
    for (const box of document.querySelectorAll("input.pick")) box.checked = false;
    renderPick();
  });
  window.addEventListener("hashchange", () => { $("view").replaceChildren(); render(); });
  await switchEnvironment(first);
}

start();
