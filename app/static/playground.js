// The playground: POST /generate and show its server-sent events as they arrive.
// fetch + a stream reader rather than EventSource, because EventSource cannot POST a body.
"use strict";

const $ = (id) => document.getElementById(id);
const STATUS_WORDS = {
  401: "The server needs an API key, or the one given is wrong",
  404: "Not found",
  413: "The request is too large",
  422: "The server refused a value",
  429: "The server is busy",
  503: "The server is not ready",
};

let controller = null; // the AbortController of the generation in flight, if any

function headers() {
  const h = { "Content-Type": "application/json", Accept: "text/event-stream" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setStatus(text) {
  $("status").textContent = text;
}

// Why an HTTP error happened, in words, from the API's one error shape {"error": {"message": ...}}.
async function describeRefusal(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = body.error?.message ?? JSON.stringify(body);
  } catch {
    // not JSON (a proxy's page, say): the status line is all there is
  }
  const lead = STATUS_WORDS[response.status] ?? "The request failed";
  const retry = response.headers.get("Retry-After");
  return `${lead} (HTTP ${response.status}): ${message}${retry ? ` Retry in ${retry} s.` : ""}`;
}

async function loadModels() {
  const select = $("model");
  const chosen = select.value;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) return showError(await describeRefusal(response));
    const { data } = await response.json();
    select.replaceChildren(...data.map((m) => new Option(`${m.id} (${m.model_type}, ${m.tokenizer.kind} tokens)`, m.id)));
    if (data.some((m) => m.id === chosen)) select.value = chosen;
    showError("");
  } catch (err) {
    showError(`Could not list the models: ${err.message}`);
  }
}

// Blank means "the server's default", so the field is left out; anything else is sent as typed,
// even when out of range, so that the server's own message explains the limit.
function numberField(body, id) {
  const raw = $(id).value.trim();
  if (raw !== "") body[id] = Number(raw);
}

function requestBody() {
  const body = { prompt: $("prompt").value, stream: true };
  for (const id of ["temperature", "max_new_tokens", "top_k", "top_p", "min_p", "repetition_penalty", "seed"]) numberField(body, id);
  if ($("model").value) body.model = $("model").value;
  if ($("regex").value) body.regex = $("regex").value; // constrained output: the server checks it
  return body;
}

// Splits a byte stream into server-sent events: blocks parted by a blank line, each with
// "event:" and "data:" lines. Lines starting with ":" (keep-alive pings) are comments.
async function* sseEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop();
    for (const block of blocks) {
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
  }
}

function showStats(done) {
  const t = done.timings;
  $("stat-tokens").textContent = done.usage.completion_tokens;
  $("stat-rate").textContent = t.tokens_per_s.toFixed(1);
  $("stat-ttft").textContent = `${(t.time_to_first_token_s * 1000).toFixed(0)} ms`;
  $("stat-total").textContent = `${t.total_s.toFixed(2)} s`;
  $("stat-finish").textContent = done.finish_reason;
  $("stat-seed").textContent = done.seed;
  $("stats").hidden = false;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  // The previous result goes at once: left in place, it would read as this request's output under its error.
  $("echo").textContent = "";
  $("output").textContent = "";
  $("stats").hidden = true;
  controller = new AbortController();
  setBusy(true);
  setStatus("Waiting for the first token…");
  let tokens = 0;
  let finished = false;
  try {
    const response = await fetch("/generate", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      showError(await describeRefusal(response));
      setStatus("");
      return;
    }
    $("echo").textContent = $("prompt").value;
    for await (const { name, data } of sseEvents(response.body)) {
      if (name === "token") {
        tokens += 1;
        $("output").append(data.text); // a token may carry "" while a character is incomplete
        setStatus(`Generating… ${tokens} tokens`);
      } else if (name === "done") {
        finished = true;
        showStats(data);
        setStatus("Done.");
      } else if (name === "error") {
        finished = true;
        showError(`The generation failed: ${data.error?.message ?? JSON.stringify(data)}`);
        setStatus(`Failed after ${tokens} tokens.`);
      }
    }
    if (!finished) {
      showError("The connection closed before the server finished the generation.");
      setStatus(`Cut off after ${tokens} tokens.`);
    }
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus(`Stopped after ${tokens} tokens.`);
    } else {
      showError(`Network error: could not reach the server (${err.message}).`);
      setStatus("");
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

// Aborting closes the connection; the server sees the disconnect and frees the batch slot.
function stop() {
  if (controller) controller.abort();
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", stop);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
});
$("api_key").addEventListener("change", loadModels);
loadModels();
