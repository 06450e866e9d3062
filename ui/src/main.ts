// One page, two ways in. Inside an MCP host (an iframe) it is an MCP App: the host hands it the tool's input and
// result and relays its tool calls and resource reads to the server. Opened directly at /ui it is a small web page
// that talks to the same server's /mcp endpoint with the bearer token.

import { App, applyDocumentTheme, applyHostFonts, applyHostStyleVariables, type McpUiHostContext } from "@modelcontextprotocol/ext-apps";

import { Controller } from "./controller";
import { HttpServer } from "./http";
import type { Server } from "./server";

const root = document.getElementById("root") as HTMLElement;

function themed(context: McpUiHostContext | undefined): void {
  if (!context) return;
  if (context.theme) applyDocumentTheme(context.theme);
  if (context.styles?.variables) applyHostStyleVariables(context.styles.variables);
  if (context.styles?.css?.fonts) applyHostFonts(context.styles.css.fonts);
}

async function inHost(): Promise<void> {
  document.documentElement.dataset.mode = "host";
  const app = new App({ name: "fts-mcp job view", version: "1.0.0" }, {}, { autoResize: true });
  const server: Server = {
    callTool: (name, args) => app.callServerTool({ name, arguments: args }) as any,
    readResource: async (uri) => {
      const first: any = (await app.readServerResource({ uri })).contents[0];
      return first && typeof first.text === "string" ? first.text : null;
    },
  };
  const view = new Controller(root, server, { mode: "host" });
  view.waiting("Waiting for the tool's answer…");
  // every handler before connect(): the host may send the tool's input and result right after the handshake
  app.ontoolinput = (params) => view.toolInput(params.arguments);
  app.ontoolresult = (result) => view.toolResult(result as any);
  app.ontoolcancelled = () => view.waiting("The tool call was cancelled.");
  app.onhostcontextchanged = (context) => themed(context);
  app.onteardown = async () => {
    view.stop();
    return {};
  };
  await app.connect();
  themed(app.getHostContext());
}

const TOKEN_KEY = "fts-mcp-token";

function inBrowser(): void {
  document.documentElement.dataset.mode = "browser";
  // A token handed over in the fragment (/ui#token=...) never reaches the server or its logs; it is kept for this
  // tab only and taken out of the address at once.
  const fragment = new URLSearchParams(location.hash.slice(1));
  const given = fragment.get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    fragment.delete("token");
  }
  // the job shown is in the address (#job=...): a link to it, and the browser's back button returns to the list
  const shown = () => new URLSearchParams(location.hash.slice(1)).get("job");
  const route = (jobId: string | null) => {
    if (jobId === shown()) return;
    const rest = new URLSearchParams(fragment);
    rest.delete("token");
    if (jobId) rest.set("job", jobId);
    else rest.delete("job");
    history.pushState(null, "", location.pathname + location.search + (rest.size ? `#${rest}` : ""));
  };
  const server = new HttpServer(new URL("/mcp", location.href).href, () => sessionStorage.getItem(TOKEN_KEY));
  let view: Controller;
  const askToken = () => {
    view.stop();
    const input = document.createElement("input");
    input.type = "password";
    input.autocomplete = "off";
    input.placeholder = "bearer token";
    input.setAttribute("data-field", "token");
    const form = document.createElement("form");
    form.className = "card token";
    const title = document.createElement("h2");
    title.textContent = "This server wants its bearer token";
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = "The token given with --token or FTS_AUTH_TOKEN. It stays in this tab (sessionStorage) and " +
      "goes only to this server, in the Authorization header.";
    const button = document.createElement("button");
    button.type = "submit";
    button.className = "btn primary";
    button.textContent = "Open";
    form.append(title, note, input, button);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!input.value.trim()) return;
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      start();
    });
    root.replaceChildren(form);
    input.focus();
  };
  view = new Controller(root, server, { mode: "browser", onRoute: route, onUnauthorized: askToken });
  const start = () => {
    const job = shown();
    if (job) view.open(job);
    else void view.showList();
  };
  // the token is out of the address before anything else runs (and out of the history entry)
  history.replaceState(null, "", location.pathname + location.search + (fragment.size ? `#${fragment}` : ""));
  window.addEventListener("popstate", start);
  start();
}

if (window.parent !== window) void inHost();
else inBrowser();
