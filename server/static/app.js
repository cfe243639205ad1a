// The IRG playground: builds a POST /generate request from the form, reads its server-sent
// events with fetch + a stream reader (EventSource cannot POST), and draws them as they arrive.
//
// Flow: submit -> checks in the browser (the form's own constraints) -> fetch with an
// AbortController -> a non-200 answer becomes an error beside the control it names -> otherwise
// every SSE frame goes to `onEvent`, which moves the stage indicator and fills one card per
// round (texts, previews, final image, download link). Cancel aborts the fetch; the server sees
// the connection close and aborts the request.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "irg.playground.apiKey";
  const IMAGE_RECIPES = new Set(["edit", "understand"]);
  const RECIPE_HINTS = {
    irg: "Thinks, draws a first image, reflects on it, then draws a refined image.",
    think_t2i: "Thinks about the prompt, then draws one image.",
    t2i: "Draws one image straight from the prompt.",
    edit: "Changes the input image as the prompt asks.",
    understand: "Answers the prompt about the input image, in text.",
  };
  const STAGE_NAMES = { think: "Thinking", reflect: "Reflection", answer: "Answer" };
  // Always sent (they have a value by default); optional ones are sent only when filled in.
  const NUMBERS = [
    "width",
    "height",
    "num_timesteps",
    "timestep_shift",
    "cfg_text_scale",
    "cfg_renorm_min",
    "temperature",
    "refine_rounds",
    "partial_images",
  ];
  const OPTIONAL_NUMBERS = ["max_think_tokens", "cfg_img_scale", "timeout_s"];

  const form = $("form");
  const generateButton = $("generate");
  const cancelButton = $("cancel");

  const run = {
    controller: null,
    recipe: "irg",
    requestId: null,
    t0: 0,
    plan: [],
    marks: [], // [{key, label, at, end}] stage entries, in order, for the timings
    rounds: new Map(),
    final: false,
    partials: 0,
    objectUrls: [],
  };
  let imageDataUrl = null;
  let retryTimer = null;

  // --- small helpers ----------------------------------------------------------------------

  function storageGet(key) {
    try {
      return window.localStorage.getItem(key);
    } catch {
      return null; // storage disabled: the key lives only in the field
    }
  }

  function storageSet(key, value) {
    try {
      if (value) window.localStorage.setItem(key, value);
      else window.localStorage.removeItem(key);
    } catch {
      /* storage disabled */
    }
  }

  function seconds(s) {
    if (s === undefined || s === null || Number.isNaN(s)) return "–";
    return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
  }

  function el(tag, attrs = {}, text = "") {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text) node.textContent = text;
    return node;
  }

  function b64ToBlob(b64, type = "image/png") {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  function announce(text) {
    $("announce").textContent = text;
  }

  // --- the server line in the header ------------------------------------------------------

  // Checked at load and after every request; while the server is not ready (loading, down,
  // draining) it is checked again every few seconds, and once it is back its caps are re-read.
  let serverTimer = null;
  async function checkServer() {
    const line = $("server-status");
    const was = line.dataset.state;
    clearTimeout(serverTimer);
    let ok = false;
    try {
      const res = await fetch("ready", { cache: "no-store" });
      const body = await res.json();
      const model = body.model ? `Model: ${body.model}` : "Model: none loaded";
      ok = res.ok;
      line.textContent = ok ? `${model} · ready` : `${model} · not ready: ${body.reason}`;
    } catch {
      line.textContent = "The server does not answer.";
    }
    line.dataset.state = ok ? "ok" : "bad";
    if (!ok) serverTimer = setTimeout(checkServer, 5000);
    else if (was === "bad") applyLimits();
  }

  // --- this server's limits ---------------------------------------------------------------
  // openapi.json states the caps in force (an operator may cap sizes, timesteps, thinks and
  // rounds below the model's own limits) and the defaults lowered to them; the form takes both,
  // so it offers only what this server accepts. Without an answer it keeps the model's limits.
  const limits = { side: 1024 };
  const CAPPED = ["width", "height", "num_timesteps", "max_think_tokens", "refine_rounds"];

  async function applyLimits() {
    const key = $("api_key").value.trim();
    let props;
    try {
      const res = await fetch("openapi.json", {
        cache: "no-store",
        headers: key ? { Authorization: `Bearer ${key}` } : {},
      });
      if (!res.ok) return;
      props = (await res.json()).components.schemas.GenerateRequest.properties;
    } catch {
      return;
    }
    for (const id of CAPPED) {
      const max = props[id]?.maximum;
      if (typeof max !== "number") continue;
      const input = $(id);
      input.max = String(max);
      if (input.defaultValue !== "" && Number(input.defaultValue) > max)
        input.defaultValue = String(max);
      if (input.value !== "" && Number(input.value) > max) input.value = String(max);
    }
    const partials = props.partial_images?.maximum;
    if (typeof partials === "number") {
      const select = $("partial_images");
      for (const option of select.options) {
        option.disabled = Number(option.value) > partials;
        // A default above the cap would make every untouched request a 400.
        if (option.disabled && option.defaultSelected) {
          option.defaultSelected = false;
          select.options[Math.min(partials, select.options.length - 1)].defaultSelected = true;
        }
      }
      if (Number(select.value) > partials) select.value = String(partials);
    }
    if (typeof props.width?.maximum === "number") limits.side = props.width.maximum;
    const chips = [...document.querySelectorAll("[data-size]")];
    for (const chip of chips)
      chip.hidden = chip.dataset.size.split("x").some((v) => Number(v) > limits.side);
    // A cap under every preset leaves no group to show (an empty row is a screen reader's too).
    document.querySelector(".presets").hidden = chips.every((chip) => chip.hidden);
    onRecipe();
    stagesIdle(); // the previewed stages follow a lowered refine_rounds default
  }

  // --- API key ----------------------------------------------------------------------------

  function initKey() {
    const input = $("api_key");
    input.value = storageGet(KEY_STORAGE) || "";
    if (input.value) $("key-box").querySelector("summary").textContent = "API key (saved)";
    input.addEventListener("change", () => {
      storageSet(KEY_STORAGE, input.value.trim());
      applyLimits();
      $("key-box").querySelector("summary").textContent = input.value.trim()
        ? "API key (saved)"
        : "API key";
      clearError("api_key");
    });
    $("key-forget").addEventListener("click", () => {
      input.value = "";
      storageSet(KEY_STORAGE, "");
      $("key-box").querySelector("summary").textContent = "API key";
      input.focus();
    });
  }

  // --- recipe and input image -------------------------------------------------------------

  function onRecipe() {
    const recipe = $("recipe").value;
    $("recipe-hint").textContent = RECIPE_HINTS[recipe] || "";
    $("image-field").hidden = !IMAGE_RECIPES.has(recipe);
    // An edit keeps the input image's size (after the resize rule); an answer has no image.
    $("size-field").disabled = IMAGE_RECIPES.has(recipe);
    $("size-hint").textContent =
      recipe === "edit"
        ? "An edit keeps the input image's shape, resized as the model reads it: short side 512 or more, long side 1024 at most."
        : recipe === "understand"
          ? "No image is drawn for an answer."
          : `Multiples of 16, at most ${limits.side}.`;
  }

  function setImage(file) {
    clearError("image");
    if (!file) return;
    // The previous image is gone from now on: never send it in place of the one just picked.
    imageDataUrl = null;
    $("image-preview").hidden = true;
    $("image-clear").hidden = true;
    if (!file.type.startsWith("image/")) {
      clearImage();
      showError("image", `${file.name} is not an image (${file.type || "unknown type"}).`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      imageDataUrl = reader.result;
      const preview = $("image-preview");
      preview.src = imageDataUrl;
      preview.alt = `Input image: ${file.name}`;
      preview.hidden = false;
      $("image-clear").hidden = false;
    };
    reader.onerror = () => showError("image", `Cannot read ${file.name}.`);
    reader.readAsDataURL(file);
  }

  function clearImage() {
    imageDataUrl = null;
    $("image").value = "";
    $("image-preview").hidden = true;
    $("image-preview").removeAttribute("src");
    $("image-clear").hidden = true;
  }

  function initImage() {
    const drop = $("drop");
    $("image").addEventListener("change", (e) => setImage(e.target.files[0]));
    $("image-clear").addEventListener("click", () => {
      clearImage();
      $("image").focus();
    });
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("over"));
    }
    // A file dropped beside the zone must not make the browser open it instead of the page.
    for (const type of ["dragover", "drop"]) {
      window.addEventListener(type, (e) => e.preventDefault());
    }
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) setImage(file);
    });
  }

  // --- errors beside their controls -------------------------------------------------------

  function controlFor(param) {
    if (param === "cfg_interval") return $("cfg_interval_low");
    if (param === "request") return generateButton;
    return $(param);
  }

  function clearError(param) {
    const slot = $(`err-${param}`);
    if (slot) {
      slot.hidden = true;
      slot.textContent = "";
    }
    const control = controlFor(param);
    if (control) control.removeAttribute("aria-invalid");
    if (param === "cfg_interval") $("cfg_interval_high").removeAttribute("aria-invalid");
  }

  function clearErrors() {
    for (const slot of document.querySelectorAll(".error")) {
      slot.hidden = true;
      slot.textContent = "";
    }
    for (const c of document.querySelectorAll("[aria-invalid]")) c.removeAttribute("aria-invalid");
    if (retryTimer) clearInterval(retryTimer);
    retryTimer = null;
  }

  // Shows `message` beside the control of `param` (the request line when there is none) and
  // returns the control, opening a folded section so the message can be seen.
  function showError(param, message) {
    let slot = param ? $(`err-${param}`) : null;
    if (!slot) {
      slot = $("err-request");
      param = "request";
    }
    slot.textContent = message;
    slot.hidden = false;
    const control = controlFor(param);
    if (control && control !== generateButton) control.setAttribute("aria-invalid", "true");
    const folded = slot.closest("details");
    if (folded) folded.open = true;
    return control;
  }

  // Focusing a control scrolls it into view, but its message is below it.
  function revealErrors() {
    const shown = [...document.querySelectorAll(".controls .error:not([hidden])")];
    if (shown.length) shown[0].scrollIntoView({ block: "nearest" });
  }

  function checkForm() {
    clearErrors();
    let first = null;
    const fail = (param, message) => {
      const control = showError(param, message);
      first = first || control;
    };
    for (const input of form.querySelectorAll("input, textarea, select")) {
      if (input.type === "file" || input.checkValidity()) continue;
      const param = input.id.startsWith("cfg_interval") ? "cfg_interval" : input.id;
      fail(param, input.validationMessage);
    }
    if (!$("prompt").value.trim()) fail("prompt", "Write a prompt first.");
    const [lo, hi] = [$("cfg_interval_low").value, $("cfg_interval_high").value];
    if ((lo === "") !== (hi === ""))
      fail("cfg_interval", "Give both ends of the interval, or neither.");
    else if (lo !== "" && Number(lo) > Number(hi))
      fail("cfg_interval", "From must not be above to.");
    if (IMAGE_RECIPES.has($("recipe").value) && !imageDataUrl) {
      fail("image", "This recipe needs an input image: drop one here or pick a file.");
    }
    if (first) first.focus();
    revealErrors();
    return first === null;
  }

  function describeValue(param, value, message) {
    if (value === null || value === undefined || param === "image" || param === "prompt") return "";
    // JSON.parse rounds a seed past 2**53: echo the digits that were typed.
    const text =
      param === "seed" && $("seed").value.trim()
        ? $("seed").value.trim()
        : typeof value === "string"
          ? value
          : JSON.stringify(value);
    return message.includes(text) ? "" : ` (sent: ${text})`;
  }

  function startRetryCountdown(retryAfter, message) {
    let left = Math.max(1, Math.ceil(Number(retryAfter) || 1));
    const slot = $("err-request");
    const render = () => {
      slot.textContent =
        left > 0 ? `${message} Try again in ${left} s.` : `${message} You can try again now.`;
    };
    showError("request", "");
    render();
    retryTimer = setInterval(() => {
      left -= 1;
      render();
      if (left <= 0) {
        clearInterval(retryTimer);
        retryTimer = null;
      }
    }, 1000);
  }

  function showTimeout(message) {
    const deadline = $("timeout_s").value;
    if (deadline) {
      return showError(
        "timeout_s",
        `The request passed its deadline of ${deadline} s (${message}). Raise the deadline, or ` +
          "ask for fewer timesteps or a smaller size.",
      );
    }
    return showError(
      "request",
      `The request passed the server's deadline (${message}). Ask for fewer timesteps or a ` +
        "smaller size, or set a longer deadline under Advanced settings.",
    );
  }

  async function onHttpError(res) {
    let error = {};
    try {
      error = (await res.json()).error || {};
    } catch {
      error = { message: res.statusText };
    }
    const message = error.message || `HTTP ${res.status}`;
    const retryAfter = res.headers.get("Retry-After");
    let control = null;
    if (res.status === 401) {
      const hasKey = Boolean($("api_key").value.trim());
      control = showError(
        "api_key",
        hasKey
          ? "The server refused this API key. Check it and try again."
          : "This server needs an API key. Enter it here; it is kept in this browser.",
      );
    } else if (res.status === 429) {
      startRetryCountdown(retryAfter, `The server is busy: ${message}.`);
      control = generateButton;
    } else if (res.status === 503) {
      const base = `The server is not taking requests right now: ${message}.`;
      if (retryAfter) startRetryCountdown(retryAfter, base);
      else showError("request", base);
      control = generateButton;
    } else if (res.status === 504 || error.code === "timeout") {
      control = showTimeout(message);
    } else if (res.status === 400) {
      let param = (error.param || "").split(".")[0];
      if (param === "body") param = imageDataUrl ? "image" : "request";
      const text = message.replace(/^[\w.]+: /, ""); // the slot already names the parameter
      control = showError(param, `${text}${describeValue(param, error.value, text)}`);
    } else {
      control = showError("request", `The server answered ${res.status}: ${message}`);
    }
    if (control) control.focus();
    revealErrors();
    return message;
  }

  // --- request body -----------------------------------------------------------------------

  // The JSON body. Seeds go up to 2**63 - 1, beyond a JS number's exact range, so the seed's
  // digits are spliced into the JSON text as they were typed.
  function requestJson() {
    const recipe = $("recipe").value;
    const body = { prompt: $("prompt").value, recipe, stream: true };
    for (const name of NUMBERS) {
      if (!$(name).disabled && !$(name).closest("fieldset:disabled"))
        body[name] = Number($(name).value);
    }
    for (const name of OPTIONAL_NUMBERS) {
      if ($(name).value !== "") body[name] = Number($(name).value);
    }
    if ($("cfg_interval_low").value !== "") {
      body.cfg_interval = [
        Number($("cfg_interval_low").value),
        Number($("cfg_interval_high").value),
      ];
    }
    if ($("cfg_renorm_type").value) body.cfg_renorm_type = $("cfg_renorm_type").value;
    if (IMAGE_RECIPES.has(recipe)) body.image = imageDataUrl;
    const seed = $("seed").value.trim();
    if (seed === "") return JSON.stringify(body);
    if (!/^\d+$/.test(seed)) return JSON.stringify({ ...body, seed: Number(seed) });
    return JSON.stringify({ ...body, seed: 0 }).replace(/"seed":0}$/, `"seed":${seed}}`);
  }

  // --- stages -----------------------------------------------------------------------------

  function stagePlan(recipe, refineRounds) {
    const plan = [{ key: "queued", label: "Queued" }];
    if (recipe === "irg" || recipe === "think_t2i")
      plan.push({ key: "think:1", label: "Thinking" });
    if (recipe === "understand") plan.push({ key: "answer:1", label: "Answering" });
    else plan.push({ key: "image:1", label: recipe === "irg" ? "Image 1" : "Image" });
    if (recipe === "irg") {
      for (let r = 2; r <= refineRounds + 1; r++) {
        plan.push({
          key: `reflect:${r}`,
          label: refineRounds > 1 ? `Reflecting ${r - 1}` : "Reflecting",
        });
        plan.push({ key: `image:${r}`, label: `Image ${r}` });
      }
    }
    plan.push({ key: "done", label: "Done" });
    return plan;
  }

  function drawStages() {
    const list = $("stages");
    list.replaceChildren();
    for (const step of run.plan) {
      const li = el("li", { "data-key": step.key }, step.label);
      list.append(li);
    }
  }

  function stageLabel(key) {
    const step = run.plan.find((s) => s.key === key);
    return step ? step.label : key;
  }

  // Enters stage `key` (once; later calls only update the detail line).
  function setStage(key, detail) {
    const now = (performance.now() - run.t0) / 1000;
    const current = run.marks.length ? run.marks[run.marks.length - 1].key : null;
    if (current !== key) {
      run.marks.push({ key, label: stageLabel(key), at: now });
      let index = run.plan.findIndex((s) => s.key === key);
      if (index < 0) {
        run.plan.splice(run.plan.length - 1, 0, { key, label: key });
        drawStages();
        index = run.plan.length - 2;
      }
      const items = $("stages").children;
      for (let i = 0; i < items.length; i++) {
        items[i].classList.toggle("done", i < index || (key === "done" && i === index));
        items[i].classList.toggle("active", i === index && key !== "done");
        if (i === index) items[i].setAttribute("aria-current", "step");
        else items[i].removeAttribute("aria-current");
      }
      announce(detail || stageLabel(key));
    }
    $("stage-now").textContent = detail || stageLabel(key);
  }

  // A stage's own end (its text.done or image.done): what comes after it is not its time.
  function endStage(key) {
    const mark = run.marks.find((m) => m.key === key);
    if (mark && mark.end === undefined) mark.end = (performance.now() - run.t0) / 1000;
    const item = $("stages").querySelector(`li[data-key="${key}"]`);
    if (item) {
      item.classList.remove("active");
      item.classList.add("done");
      item.removeAttribute("aria-current");
    }
  }

  // The stage that was running (or, between stages, the next one) is marked as not reached.
  function failStage(text) {
    const stages = $("stages");
    const failed =
      stages.querySelector(".active") ||
      [...stages.children].find((li) => !li.classList.contains("done"));
    if (failed) {
      failed.classList.remove("active");
      failed.classList.add("failed");
    }
    $("stage-now").textContent = text;
    $("progress").hidden = true;
    for (const card of run.rounds.values()) {
      card.progress.hidden = true;
      const placeholder = card.img ? null : card.frame.querySelector(".placeholder");
      if (placeholder) placeholder.textContent = "not drawn";
      for (const block of card.texts.values()) block.body.classList.remove("live");
    }
    announce(text);
  }

  // --- rounds -----------------------------------------------------------------------------

  function roundLabel(round) {
    if (run.recipe === "understand") return "Answer";
    if (run.recipe === "edit") return "Round 1 · edited image";
    if (run.recipe !== "irg") return "Round 1 · image";
    return round === 1 ? "Round 1 · first image" : `Round ${round} · refined image`;
  }

  function getRound(round) {
    let card = run.rounds.get(round);
    if (card) return card;
    const node = $("round-template").content.firstElementChild.cloneNode(true);
    node.dataset.round = String(round);
    const label = node.querySelector(".round-label");
    label.textContent = roundLabel(round);
    label.id = `round-${round}-label`;
    node.setAttribute("aria-labelledby", label.id);
    const figure = node.querySelector("figure");
    if (run.recipe === "understand") figure.hidden = true;
    card = {
      node,
      texts: new Map(),
      frame: node.querySelector(".frame"),
      caption: node.querySelector("figcaption"),
      progress: node.querySelector("progress"),
      download: node.querySelector(".download"),
      img: null,
    };
    card.progress.setAttribute("aria-label", `Round ${round} denoising progress`);
    const [w, h] = [Number($("width").value), Number($("height").value)];
    if (run.recipe !== "edit" && w > 0 && h > 0) card.frame.style.aspectRatio = `${w} / ${h}`;
    // Rounds stay in order even if a later one's first event came first.
    const after = [...run.rounds.keys()].filter((r) => r > round).sort((a, b) => a - b)[0];
    $("rounds").insertBefore(node, after ? run.rounds.get(after).node : null);
    run.rounds.set(round, card);
    return card;
  }

  function textBlock(stage, round) {
    const card = getRound(round);
    let block = card.texts.get(stage);
    if (block) return block;
    const section = el("section", { class: `text ${stage}` });
    section.append(el("h4", {}, STAGE_NAMES[stage] || stage));
    const body = el("p", { class: "stream live" });
    section.append(body);
    card.node.querySelector(".texts").append(section);
    block = { section, body };
    card.texts.set(stage, block);
    return block;
  }

  function showImage(round, b64, caption, final, width, height) {
    const card = getRound(round);
    if (!card.img) {
      card.img = el("img", { class: "result" });
      card.frame.replaceChildren(card.img);
    }
    const img = card.img;
    img.src = `data:image/png;base64,${b64}`;
    img.alt = `${roundLabel(round)}${final ? "" : " (preview)"}: ${$("prompt").value.slice(0, 200)}`;
    img.classList.toggle("partial", !final);
    if (width && height) {
      img.width = width;
      img.height = height;
      // Tiny images (the test model's) are scaled up without blurring.
      img.classList.toggle("pixelated", Math.max(width, height) < 256);
    }
    card.caption.textContent = caption;
    if (final) {
      const url = URL.createObjectURL(b64ToBlob(b64));
      run.objectUrls.push(url);
      card.download.href = url;
      card.download.download = `irg-${run.requestId || "image"}-round${round}.png`;
      card.download.textContent = `Download round ${round} PNG`;
      card.download.hidden = false;
      card.progress.hidden = true;
    }
  }

  // --- timings ----------------------------------------------------------------------------

  function drawSummary(done) {
    const dl = $("timings");
    dl.replaceChildren();
    const add = (name, value) => {
      const pair = el("div");
      pair.append(el("dt", {}, name), el("dd", {}, value));
      dl.append(pair);
    };
    const end = (performance.now() - run.t0) / 1000;
    run.marks.forEach((mark, i) => {
      if (mark.key === "done") return;
      const next = i + 1 < run.marks.length ? run.marks[i + 1].at : end;
      const label = mark.key === "queued" ? "Waiting (queue, prompt)" : mark.label;
      add(label, seconds((mark.end ?? next) - mark.at));
      const following = run.marks[i + 1];
      if (mark.key.startsWith("image:") && mark.end !== undefined && following?.key !== "done") {
        // IRG encodes the finished image back into the context before it reflects.
        add(`${mark.label} read back`, seconds(next - mark.end));
      }
    });
    if (done) {
      const t = done.timings || {};
      if ("first_text" in t) add("First text token (server)", seconds(t.first_text));
      if ("first_image" in t) add("First image (server)", seconds(t.first_image));
      add("Total (server)", seconds(t.total));
      const u = done.usage || {};
      if ("generated_tokens" in u) add("Tokens generated", String(u.generated_tokens));
      if ("denoise_steps" in u) add("Denoising steps", String(u.denoise_steps));
    }
    add("Total (this page)", seconds(end));
    $("summary").hidden = false;
  }

  function showSeed(seed) {
    const line = $("seed-used");
    line.replaceChildren(`Seed ${seed}. `);
    const reuse = el("button", { type: "button", class: "link" }, "Use this seed again");
    reuse.addEventListener("click", () => {
      $("seed").value = seed;
      $("seed").focus();
    });
    line.append(reuse);
  }

  // --- events -----------------------------------------------------------------------------

  function onEvent(name, raw) {
    let data;
    try {
      data = JSON.parse(raw);
    } catch {
      return;
    }
    if (data.request_id) run.requestId = data.request_id;
    switch (name) {
      case "queued": {
        const p = data.position;
        setStage("queued", p > 0 ? `Queued · ${p} ahead of you` : "Queued · next to start");
        break;
      }
      case "text.delta": {
        const body = textBlock(data.stage, data.round).body;
        // Follow the text as it grows, unless the reader has scrolled up in it.
        const following = body.scrollHeight - body.scrollTop - body.clientHeight < 8;
        body.append(data.delta);
        if (following) body.scrollTop = body.scrollHeight;
        const verb = { think: "Thinking", reflect: "Reflecting", answer: "Answering" }[data.stage];
        setStage(`${data.stage}:${data.round}`, `${verb || data.stage}…`);
        break;
      }
      case "text.done": {
        endStage(`${data.stage}:${data.round}`);
        const block = textBlock(data.stage, data.round);
        block.body.textContent = data.text;
        block.body.classList.remove("live");
        if (!data.text) block.body.textContent = "(empty)";
        break;
      }
      case "image.progress": {
        const card = getRound(data.round);
        const label = run.recipe === "irg" ? `Image ${data.round}` : "Image";
        setStage(`image:${data.round}`, `${label} · step ${data.step} of ${data.total_steps}`);
        for (const bar of [card.progress, $("progress")]) {
          bar.max = data.total_steps;
          bar.value = data.step;
          bar.hidden = false;
        }
        if (!card.img) card.frame.querySelector(".placeholder").textContent = "denoising…";
        break;
      }
      case "image.partial":
        showImage(
          data.round,
          data.b64_png,
          `${roundLabel(data.round)} · preview ${data.index + 1} of ${run.partials}`,
          false,
        );
        break;
      case "image.done":
        showImage(
          data.round,
          data.b64_png,
          `${roundLabel(data.round)} · ${data.width}×${data.height}`,
          true,
          data.width,
          data.height,
        );
        $("progress").hidden = true;
        endStage(`image:${data.round}`);
        if (run.recipe === "irg" && run.plan.some((s) => s.key === `reflect:${data.round + 1}`)) {
          // The image goes back into the context (VAE and ViT) before the reflection starts.
          $("stage-now").textContent = `Image ${data.round} done · reading it back…`;
        }
        break;
      case "done": {
        run.final = true;
        setStage("done", `Done in ${seconds(data.timings && data.timings.total)}`);
        $("progress").hidden = true;
        for (const card of run.rounds.values()) {
          for (const block of card.texts.values()) block.body.classList.remove("live");
        }
        drawSummary(data);
        // The seed may exceed 2**53, where JSON.parse rounds: show its digits as sent. (Inside a
        // JSON string every quote is escaped, so this pattern only matches the real key.)
        const seed = raw.match(/"seed"\s*:\s*(\d+)/);
        if (seed) showSeed(seed[1]);
        break;
      }
      case "error": {
        run.final = true;
        const text = `Failed: ${data.message} (${data.code})`;
        failStage(text);
        if (data.code === "timeout") showTimeout(data.message);
        else if (data.code === "aborted")
          showError("request", `The server aborted the request: ${data.message}`);
        else if (data.code === "shutdown")
          showError("request", `The server is shutting down: ${data.message}`);
        else showError("request", `The request failed: ${data.message}`);
        drawSummary(null);
        break;
      }
      default:
        break;
    }
  }

  // SSE over a fetch body: frames are separated by a blank line; `data:` lines join with "\n";
  // lines starting with ":" are keep-alive comments.
  async function readStream(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let name = "message";
    let data = [];
    const line = (text) => {
      if (text === "") {
        if (data.length) {
          onEvent(name, data.join("\n"));
        }
        name = "message";
        data = [];
      } else if (text.startsWith(":")) {
        // keep-alive
      } else {
        const colon = text.indexOf(":");
        const field = colon < 0 ? text : text.slice(0, colon);
        let value = colon < 0 ? "" : text.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const text of lines) line(text);
    }
    if (!run.final && buffer) line(buffer);
    if (!run.final) line("");
  }

  // --- run / cancel -----------------------------------------------------------------------

  // Generate stays focusable while a request runs (aria-disabled, not disabled), so the focus
  // is not lost when it is pressed; Tab reaches Cancel next to it.
  function setRunning(running) {
    if (running) generateButton.setAttribute("aria-disabled", "true");
    else generateButton.removeAttribute("aria-disabled");
    cancelButton.disabled = !running;
    $("results").setAttribute("aria-busy", running ? "true" : "false");
    generateButton.textContent = running ? "Generating…" : "Generate";
  }

  function resetView(recipe, refineRounds) {
    for (const url of run.objectUrls) URL.revokeObjectURL(url);
    Object.assign(run, {
      recipe,
      requestId: null,
      t0: performance.now(),
      plan: stagePlan(recipe, refineRounds),
      marks: [],
      rounds: new Map(),
      final: false,
      objectUrls: [],
    });
    drawStages();
    $("rounds").replaceChildren();
    // Every planned round has its card from the start: the layout does not jump as they fill.
    const images = recipe === "irg" ? refineRounds + 1 : 1;
    for (let r = 1; r <= images; r++) getRound(r);
    $("summary").hidden = true;
    $("seed-used").replaceChildren();
    $("progress").hidden = true;
    $("stage-now").textContent = "Sending the request…";
    $("results").classList.add("started");
  }

  async function generate() {
    if (run.controller) return;
    if (!checkForm()) return;
    const json = requestJson();
    const recipe = $("recipe").value;
    resetView(recipe, Number($("refine_rounds").value));
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    const key = $("api_key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const controller = new AbortController();
    run.controller = controller;
    run.partials = Number($("partial_images").value);
    let streaming = false;
    setRunning(true);
    if (window.matchMedia("(max-width: 860px)").matches) {
      // One column: the live view is below the form.
      $("results").scrollIntoView({ block: "start" });
    }
    try {
      const res = await fetch("generate", {
        method: "POST",
        headers,
        body: json,
        signal: controller.signal,
      });
      if (!res.ok) {
        const message = await onHttpError(res);
        $("rounds").replaceChildren();
        failStage(`Not started: ${message}`);
        return;
      }
      streaming = true;
      await readStream(res);
      if (!run.final) {
        failStage("The connection closed before the request finished.");
        showError(
          "request",
          "The connection to the server closed before the request finished. Try again.",
        );
      }
    } catch (err) {
      if (err && err.name === "AbortError") {
        failStage("Cancelled: the server stops the request.");
        drawSummary(null);
      } else {
        const why = err && err.message ? err.message : String(err);
        failStage(
          streaming ? "The connection to the server was lost." : "Cannot reach the server.",
        );
        showError(
          "request",
          streaming
            ? `The connection to the server was lost (${why}). Try again.`
            : `Cannot reach the server: ${why}`,
        );
      }
    } finally {
      run.controller = null;
      setRunning(false);
      checkServer();
    }
  }

  function cancel() {
    if (run.controller) {
      run.controller.abort();
      generateButton.focus();
    }
  }

  // --- defaults ---------------------------------------------------------------------------

  function resetAdvanced() {
    for (const input of $("advanced").querySelectorAll("input, select")) {
      if (input.tagName === "SELECT")
        input.selectedIndex = [...input.options].findIndex((o) => o.defaultSelected);
      else input.value = input.defaultValue;
      clearError(input.id.startsWith("cfg_interval") ? "cfg_interval" : input.id);
    }
  }

  function init() {
    initKey();
    initImage();
    onRecipe();
    $("recipe").addEventListener("change", () => {
      onRecipe();
      stagesIdle();
    });
    $("refine_rounds").addEventListener("change", stagesIdle);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      generate();
    });
    cancelButton.addEventListener("click", cancel);
    $("reset").addEventListener("click", resetAdvanced);
    for (const chip of document.querySelectorAll("[data-size]")) {
      chip.addEventListener("click", () => {
        const [w, h] = chip.dataset.size.split("x");
        $("width").value = w;
        $("height").value = h;
        clearError("width");
        clearError("height");
      });
    }
    form.addEventListener("input", (e) => {
      const id = e.target.id || "";
      if (id) clearError(id.startsWith("cfg_interval") ? "cfg_interval" : id);
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && form.contains(e.target)) {
        e.preventDefault();
        form.requestSubmit();
      } else if (e.key === "Escape" && run.controller) {
        e.preventDefault();
        cancel();
      }
    });
    stagesIdle();
    checkServer();
    applyLimits();
  }

  // Before the first request the stage list previews the chosen recipe's stages.
  function stagesIdle() {
    if (run.t0) return;
    run.plan = stagePlan($("recipe").value, Number($("refine_rounds").value));
    drawStages();
  }

  init();
})();
