// The official ollama JavaScript library, unmodified, against ssw: each call's
// outcome is printed as one JSON object for tests/test_ollama_e2e.py to check.
// Usage: node client.mjs <host> <api key> <model to pull, or "">
import { Ollama } from 'ollama'

const [host, key, pullName] = process.argv.slice(2)
const ollama = new Ollama({ host, headers: { Authorization: `Bearer ${key}` } })
const hi = [{ role: 'user', content: 'hi' }]
const out = {}

out.version = (await ollama.version()).version
const chat = await ollama.chat({ model: 'chatty', messages: hi, options: { num_predict: 3 } })
out.chat = { content: chat.message.content, done: chat.done, eval_count: chat.eval_count }
let streamed = ''
let parts = 0
for await (const part of await ollama.chat({ model: 'chatty', messages: hi, stream: true, options: { num_predict: 4 } })) {
  streamed += part.message.content
  parts += 1
}
out.stream = { content: streamed, parts }
const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: {} } } }]
const called = await ollama.chat({ model: 'chatty', messages: hi, tools })
out.tools = called.message.tool_calls.map((c) => [c.function.name, c.function.arguments])
const schema = { type: 'object', properties: { mood: { type: 'string' } } }
out.format = JSON.parse((await ollama.chat({ model: 'chatty', messages: hi, format: schema })).message.content)
out.think = (await ollama.chat({ model: 'chatty', messages: hi, think: true, options: { num_predict: 1 } })).message.thinking
out.generate = (await ollama.generate({ model: 'chatty', prompt: 'once', options: { num_predict: 2 } })).response
out.embed = (await ollama.embed({ model: 'embedder', input: ['a', 'b'] })).embeddings.map((v) => v.length)
out.list = (await ollama.list()).models.map((m) => m.name)
out.show = (await ollama.show({ model: 'chatty' })).capabilities
out.load = (await ollama.chat({ model: 'chatty', messages: [], keep_alive: '10m' })).done_reason
out.ps = (await ollama.ps()).models.map((m) => m.name)
out.unload = (await ollama.chat({ model: 'chatty', messages: [], keep_alive: 0 })).done_reason
if (pullName) {
  const statuses = []
  let completed = 0
  for await (const p of await ollama.pull({ model: pullName, stream: true })) {
    statuses.push(p.status)
    if (p.completed) completed = p.completed
  }
  out.pull = { statuses, completed }
}
try {
  await ollama.chat({ model: 'nope:7b', messages: hi })
  out.missing = 'answered'
} catch (err) {
  out.missing = { status: err.status_code, error: err.error }
}
console.log(JSON.stringify(out))
