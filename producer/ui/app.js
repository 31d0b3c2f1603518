// The playground: a form that submits a job, follows its events, and a gallery of jobs.
import { events, get, key, post } from "/ui/api.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const state = { tiers: [], models: [], current: null, stream: null, shown: null };

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function showError(error) {
  if (error && error.name === "AbortError") return;
  $("error").textContent = error ? String(error.message || error) : "";
  $("error").hidden = !error;
}

async function guarded(action) {
  try {
    showError(null);
    await action();
  } catch (error) {
    showError(error);
  }
}

const credits = (n) => `${n} credit${n === 1 ? "" : "s"}`;

function option(value, text, disabled = false) {
  return element("option", { value, textContent: text, disabled });
}

function tier() {
  return state.tiers.find((t) => t.name === $("tier").value);
}

function fillModels() {
  const chosen = tier();
  if (!chosen) return;
  const served = state.models.filter((m) => m.tiers.includes(chosen.name));
  $("model").replaceChildren(
    option("", `Tier default (${chosen.default_model})`),
    ...served
      .filter((m) => m.id !== chosen.default_model)
      .map((m) => {
        const allowed = m.entitled || m.default_on.includes(chosen.name);
        return option(m.id, allowed ? m.name : `${m.name} (upon request)`, !allowed);
      }),
  );
  $("steps").placeholder = String(chosen.default_steps);
  $("steps").max = String(chosen.max_steps);
  $("width").max = $("height").max = String(chosen.max_side);
}

async function loadChoices() {
  const [tiers, styles, models] = await Promise.all([
    get("/v1/tiers"),
    get("/v1/styles"),
    get("/v1/models"),
  ]);
  state.tiers = tiers.tiers;
  state.models = models.models;
  const previous = $("tier").value || "normal";
  $("tier").replaceChildren(...state.tiers.map((t) => option(t.name, `${t.name} (${credits(t.price)})`)));
  if (state.tiers.some((t) => t.name === previous)) $("tier").value = previous;
  $("style").replaceChildren(option("", "No style"), ...styles.styles.map((s) => option(s.slug, s.name)));
  fillModels();
}

async function loadCredits() {
  const account = await get("/v1/account");
  $("credits").textContent = `Credits left: ${account.credits}`;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function jobBody() {
  const body = { prompt: $("prompt").value, tier: $("tier").value };
  const optional = {
    negative_prompt: $("negative").value.trim() || undefined,
    style: $("style").value || undefined,
    model: $("model").value || undefined,
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    seed: number("seed"),
  };
  for (const [name, value] of Object.entries(optional)) if (value !== undefined) body[name] = value;
  return body;
}

function imageOf(job) {
  return job.images && job.images.length ? job.images[0] : null;
}

function figureContent(job, image) {
  if (!image.url) {
    const gone = `Seed ${image.seed}, ${image.width}×${image.height} px: this image has expired and was deleted.`;
    return [element("figcaption", {}, gone)];
  }
  const picture = element("img", {
    src: image.url,
    alt: `Generated image: ${job.request.prompt}`,
    width: image.width,
    height: image.height,
  });
  const link = element("a", { href: image.url, download: "", textContent: "Download image" });
  const caption = `Seed ${image.seed}, ${image.width}×${image.height} px. `;
  return [picture, element("figcaption", {}, caption, link)];
}

function showProgress(job) {
  const progress = job.progress;
  if (job.status === "running" && progress && progress.total) {
    $("progress").max = progress.total;
    $("progress").value = progress.step;
    $("status").textContent = `Running: step ${progress.step} of ${progress.total}`;
  } else {
    if (job.status === "succeeded") $("progress").value = $("progress").max;
    const stopped = job.status === "canceled" && progress ? ` at step ${progress.step} of ${progress.total}` : "";
    const reason = job.error ? `: ${job.error}` : "";
    $("status").textContent = `Job ${job.status}${stopped}${reason}`;
  }
  $("cancel").hidden = TERMINAL.has(job.status);
}

function showResult(job) {
  showProgress(job);
  const image = imageOf(job);
  if (!image) return;
  $("result").replaceChildren(...figureContent(job, image));
  $("result").hidden = false;
}

async function follow(job) {
  const controller = new AbortController();
  state.stream = controller;
  let lastId = null;
  // A stream ends after SDQ_STREAM_MAX_SECONDS: resume it until the job ends.
  for (let attempt = 0; attempt < 50 && !controller.signal.aborted; attempt++) {
    for await (const event of events(`/v1/jobs/${job.id}/events`, { signal: controller.signal, lastId })) {
      if (event.id) lastId = event.id;
      const data = JSON.parse(event.data).data;
      showProgress({ ...job, ...data });
      if (TERMINAL.has(data.status)) return get(`/v1/jobs/${job.id}`);
    }
  }
  return get(`/v1/jobs/${job.id}`);
}

async function submit(event) {
  event.preventDefault();
  if (state.stream) state.stream.abort();
  $("submit").disabled = true;
  try {
    const job = await post("/v1/jobs", jobBody());
    state.current = job;
    $("current").hidden = false;
    $("result").hidden = true;
    $("progress").value = 0;
    showProgress(job);
    if (job.credits_left !== null) $("credits").textContent = `Credits left: ${job.credits_left}`;
    loadGallery().catch(showError);
    $("submit").disabled = false;
    showResult(await follow(job));
  } finally {
    $("submit").disabled = false;
  }
  await Promise.all([loadGallery(), loadCredits()]);
}

async function cancel(job) {
  const canceled = await post(`/v1/jobs/${job.id}/cancel`);
  if (canceled.credits_left !== null) $("credits").textContent = `Credits left: ${canceled.credits_left}`;
  await loadGallery();
  return canceled;
}

function thumbnail(job) {
  const image = imageOf(job);
  const label = `${job.status}: ${job.request.prompt}`;
  const inner = image && image.url
    ? element("img", { src: image.url, alt: label, loading: "lazy", width: image.width, height: image.height })
    : element("span", { className: "placeholder", textContent: label });
  const open = element("button", { type: "button", className: "thumb", title: label }, inner);
  open.dataset.jobId = job.id;
  open.addEventListener("click", () => guarded(() => openDetails(job.id)));
  return element("li", {}, open);
}

async function loadGallery() {
  const page = await get("/v1/jobs?limit=24");
  $("gallery").replaceChildren(...page.jobs.map(thumbnail));
  if (!page.jobs.length) $("gallery").append(element("li", { textContent: "No jobs yet." }));
}

function details(job) {
  const image = imageOf(job);
  const rows = [
    ["Prompt", job.prompt || job.request.prompt],
    ["Negative prompt", job.negative_prompt || "—"],
    ["Style", job.style || "—"],
    ["Model", job.model_id],
    ["Tier", job.tier],
    ["Status", job.status],
    ["Seed", String(job.seed)],
    ["Size", image ? `${image.width}×${image.height} px` : "—"],
    ["Steps", String(job.steps)],
    ["Cost", `${credits(job.cost)}${job.refunded ? " (refunded)" : ""}`],
    ["Error", job.error || "—"],
  ];
  const list = element("dl", {}, ...rows.flatMap(([name, value]) => [
    element("dt", { textContent: name }),
    element("dd", { textContent: value }),
  ]));
  const figures = (job.images || []).map((each) => element("figure", {}, ...figureContent(job, each)));
  return [list, ...figures];
}

async function openDetails(id) {
  const job = await get(`/v1/jobs/${id}`);
  state.shown = job;
  $("details-body").replaceChildren(...details(job));
  $("details-cancel").hidden = TERMINAL.has(job.status);
  if (!$("details").open) $("details").showModal();
}

async function useKey(event) {
  if (event) event.preventDefault();
  const value = $("key").value.trim();
  if (value) key.set(value);
  await Promise.all([loadChoices(), loadCredits(), loadGallery()]);
}

function forget() {
  key.forget();
  $("key").value = "";
  $("credits").textContent = "";
  $("gallery").replaceChildren();
  showError(null);
  $("key").focus();
}

function start() {
  $("key-form").addEventListener("submit", (e) => guarded(() => useKey(e)));
  $("forget").addEventListener("click", forget);
  $("tier").addEventListener("change", fillModels);
  $("job-form").addEventListener("submit", (e) => guarded(() => submit(e)));
  $("cancel").addEventListener("click", () => guarded(() => cancel(state.current)));
  $("refresh").addEventListener("click", () => guarded(loadGallery));
  $("details-close").addEventListener("click", () => $("details").close());
  $("details-cancel").addEventListener("click", () =>
    guarded(async () => openDetails((await cancel(state.shown)).id)),
  );
  if (key.get()) {
    $("key").value = key.get();
    guarded(() => useKey());
  }
}

start();
