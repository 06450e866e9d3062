// What the view needs from the server, whichever way it is reached: through the MCP host (App.callServerTool,
// App.readServerResource) or, at /ui, over HTTP to the same origin.

export interface ToolResult {
  isError?: boolean;
  structuredContent?: any;
  content?: { type: string; text?: string }[];
}

export interface Server {
  callTool(name: string, args: Record<string, unknown>): Promise<ToolResult>;
  readResource(uri: string): Promise<string | null>;
}

export function resultText(result: ToolResult): string {
  return (result.content ?? []).map((c) => c.text ?? "").join("\n").trim();
}
