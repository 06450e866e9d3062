// A minimal MCP Apps host for the browser tests: an MCP client of the server (streamable HTTP, relayed by the test's
// host server as a web host's backend would), and for a tool whose definition links a ui:// resource, that resource
// rendered in a sandboxed iframe (opaque origin, the spec's restrictive default CSP) and connected through the
// ext-apps AppBridge, which relays the view's tool calls and resource reads to the server. The test drives it
// through `window.host`.

import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import {
  AppBridge,
  getToolUiResourceUri,
  PostMessageTransport,
  RESOURCE_MIME_TYPE,
} from "@modelcontextprotocol/ext-apps/app-bridge";

const EXTENSION = "io.modelcontextprotocol/ui";
const CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; " +
  "media-src data:; connect-src 'none'; frame-src 'none'; object-src 'none'; base-uri 'none'";
const INFO = { name: "fts-test-host", version: "1.0.0" };

const query = new URLSearchParams(location.search);
const status = document.getElementById("status") as HTMLElement;
const chat = document.getElementById("chat") as HTMLElement;
const relayed: { method: string; params: any }[] = [];

function say(text: string): HTMLElement {
  const turn = document.createElement("div");
  turn.className = "turn";
  turn.textContent = text;
  chat.append(turn);
  return turn;
}

async function main(): Promise<void> {
  const headers: Record<string, string> = {};
  if (query.get("token")) headers.Authorization = `Bearer ${query.get("token")}`;
  const client = new Client(INFO, { capabilities: { extensions: { [EXTENSION]: { mimeTypes: [RESOURCE_MIME_TYPE] } } } } as any);
  const endpoint = new URL(query.get("mcp") ?? "/mcp", location.href); // a web host's backend relays it to the server
  await client.connect(new StreamableHTTPClientTransport(endpoint, { requestInit: { headers } }));
  const request = client.request.bind(client) as any;
  (client as any).request = (req: any, ...rest: any[]) => {
    relayed.push({ method: req.method, params: req.params });
    return request(req, ...rest);
  };
  const tools = (await client.listTools()).tools;
  status.textContent = `connected to ${client.getServerVersion()?.name}`;

  async function runTool(name: string, args: Record<string, unknown>): Promise<any> {
    const tool = tools.find((t) => t.name === name);
    if (!tool) throw new Error(`no tool ${name}`);
    say(`The agent calls ${name}(${JSON.stringify(args)})`);
    const uri = getToolUiResourceUri(tool);
    if (!uri) {
      const result = await client.callTool({ name, arguments: args });
      say(JSON.stringify(result.structuredContent ?? result.content).slice(0, 300));
      return result.structuredContent;
    }
    const content: any = (await client.readResource({ uri })).contents[0];
    if (content.mimeType !== RESOURCE_MIME_TYPE) throw new Error(`${uri} is ${content.mimeType}`);
    const iframe = document.createElement("iframe");
    iframe.setAttribute("sandbox", "allow-scripts");
    iframe.title = name;
    iframe.srcdoc = String(content.text).replace(/<head>/i, `<head><meta http-equiv="Content-Security-Policy" content="${CSP}">`);
    chat.append(iframe);
    const bridge = new AppBridge(client, INFO, { serverTools: {}, serverResources: {}, logging: {}, openLinks: {} }, {
      hostContext: { theme: (query.get("theme") as "light" | "dark") ?? "light", displayMode: "inline", platform: "web",
        containerDimensions: { maxHeight: 6000 } },
    } as any);
    bridge.onsizechange = ({ height }) => {
      if (height) iframe.style.height = `${height}px`;
    };
    const ready = new Promise<void>((resolve) => (bridge.oninitialized = () => resolve()));
    await bridge.connect(new PostMessageTransport(iframe.contentWindow as Window, iframe.contentWindow as Window));
    await ready;
    await bridge.sendToolInput({ arguments: args });
    const result = await client.callTool({ name, arguments: args });
    await bridge.sendToolResult(result as any);
    return result.structuredContent;
  }

  (window as any).host = {
    runTool,
    relayed,
    serverExtensions: client.getServerCapabilities()?.extensions ?? null,
    toolMeta: Object.fromEntries(tools.map((t) => [t.name, t._meta ?? null])),
  };
}

main().catch((error) => {
  status.textContent = `failed: ${error}`;
  (window as any).hostError = String(error);
});
