import Foundation
import Testing

@testable import Spindle

/// Runs `spindle` with `arguments` and kills it with SIGKILL after `milliseconds` unless it ended
/// first; returns whether it was killed, its status and its output.
func spindleKilled(_ arguments: [String], after milliseconds: Int) throws -> (
    killed: Bool, status: Int32, output: String, errors: String, milliseconds: Int
) {
    let process = Process()
    process.executableURL = spindleBinary()
    process.arguments = arguments
    let output = Pipe()
    let errors = Pipe()
    process.standardOutput = output
    process.standardError = errors
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let started = DispatchTime.now().uptimeNanoseconds
    let deadline = started + UInt64(milliseconds) * 1_000_000
    while process.isRunning && DispatchTime.now().uptimeNanoseconds < deadline { usleep(500) }
    let elapsed = Int((DispatchTime.now().uptimeNanoseconds - started) / 1_000_000)
    let killed = process.isRunning
    if killed { kill(process.processIdentifier, SIGKILL) }
    let outputData = output.fileHandleForReading.readDataToEndOfFile()
    let errorData = errors.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (
        killed && process.terminationReason == .uncaughtSignal, process.terminationStatus,
        String(decoding: outputData, as: UTF8.self), String(decoding: errorData, as: UTF8.self), elapsed
    )
}

/// What the crash runs did, printed at the end (Tools/crash.sh prints it for long runs).
struct CrashFigures: CustomStringConvertible {
    var rounds = 0
    var writesAcknowledged = 0
    var flushesAcknowledged = 0
    var killedServes = 0
    var killed: [String: Int] = [:]
    var finishedBeforeKill: [String: Int] = [:]
    var rebuildsResumed = 0
    var blocksChecked = 0

    var description: String {
        let kinds = Set(killed.keys).union(finishedBeforeKill.keys).sorted().map {
            "\($0) \(killed[$0, default: 0]) killed/\(finishedBeforeKill[$0, default: 0]) finished"
        }
        return
            "rounds \(rounds), writes acknowledged \(writesAcknowledged), flushes acknowledged \(flushesAcknowledged), "
            + "serve killed \(killedServes) times; \(kinds.joined(separator: ", ")); interrupted rebuilds resumed \(rebuildsResumed); "
            + "blocks checked against the flush contract \(blocksChecked); mismatches 0"
    }
}

/// Process-level crash tests: `spindle serve` is killed with SIGKILL while a client writes and
/// flushes through NBD, and the commands that change an array or a pool (snapshot, resize,
/// delete, scrub --repair, replace with its rebuild, rebuild) are killed at random moments. After
/// each kill the array is reassembled (resyncing what the crash left dirty) and checked: every
/// byte the client saw flushed is there, every other block holds its flushed contents or a
/// version written since, snapshots are intact, `pool check` is clean and a scrub finds no
/// mismatch. SPINDLE_CRASH_ROUNDS and SPINDLE_CRASH_SEED make longer or other runs.
@Suite("process crashes: SIGKILL at random moments, then reassembly and checks", .serialized)
struct ProcessCrashTests {
    @Test("serve, snapshot, resize, delete, scrub, replace and rebuild killed at random moments")
    func randomKills() throws {
        let environment = ProcessInfo.processInfo.environment
        let rounds = Int(environment["SPINDLE_CRASH_ROUNDS"] ?? "") ?? 12
        let seed = UInt64(environment["SPINDLE_CRASH_SEED"] ?? "") ?? 1
        let figures = try CrashRun(seed: seed).run(rounds: rounds)
        print("crash run, seed \(seed): \(figures)")
        #expect(figures.killedServes > 0)
    }
}

/// Stops a crash run after a recorded issue.
private struct CrashCheckFailed: Error {}

private final class CrashRun {
    let seed: UInt64
    var random: SeededRandom
    let folder = TemporaryFolder("crash")
    let exports: String
    var figures = CrashFigures()
    /// The writable volume, and the read-only snapshots with the contents they must keep.
    var model = StackSimulation.VolumeModel([UInt8](repeating: 0, count: 16 << 20))
    var snapshots: [String: [UInt8]] = [:]
    var members: [String]
    var nextImage = 4
    var counter: UInt64 = 0

    init(seed: UInt64) throws {
        self.seed = seed
        random = SeededRandom(seed: seed)
        let folder = self.folder
        exports = folder.file("exports")
        members = (0..<4).map { folder.file("m\($0).img") }
        try FileManager.default.createDirectory(atPath: exports, withIntermediateDirectories: true)
    }

    deinit { folder.remove() }

    var dir: [String] { ["--dir", folder.path] }
    var arrayArguments: [String] { ["--scan", folder.path, "--array-name", "r5"] }

    func run(_ arguments: [String], _ what: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> String
    {
        let result = try spindle(arguments)
        try #require(
            result.status == 0,
            "seed \(seed): \(what): spindle \(arguments.joined(separator: " ")) failed: \(result.errors)",
            sourceLocation: sourceLocation)
        return result.output
    }

    func run(rounds: Int) throws -> CrashFigures {
        _ = try run(["array", "create", "r5"] + members + ["--level", "5", "--size", "40M"], "create the array")
        _ = try run(["pool", "create", "tank", "array:r5"] + dir, "create the pool")
        _ = try run(["volume", "create", "tank/v", "--size", "16M"] + dir, "create the volume")
        for round in 0..<rounds {
            try writeAndKillServe(round: round)
            try verifyVolumes(round: round, all: round == rounds - 1 || round % 4 == 3)
            try killACommand(round: round)
            try checkPoolAndScrub(round: round)
            figures.rounds += 1
        }
        try verifyVolumes(round: rounds, all: true)
        return figures
    }

    /// Serves the volume, writes and flushes through NBD in pipelined batches, and kills the
    /// server after a random time.
    func writeAndKillServe(round: Int) throws {
        let socket = folder.file("s.sock")
        let server = try ServeProcess(["volume:tank/v", "--socket", socket], directory: folder.path)
        let client = try RawNBDClient(unixSocket: socket)
        let negotiated = try client.go("tank/v")
        try #require(Int(negotiated.size) == model.current.count, "seed \(seed) round \(round): the export's size")
        let pid = server.process.processIdentifier
        let delay = 20 + Int(random.below(400))
        // A thread of its own: the shared queues may all be busy with other tests' blocking work.
        Thread.detachNewThread {
            usleep(UInt32(delay) * 1000)
            kill(pid, SIGKILL)
        }
        let blocks = model.current.count / 4096
        serving: while true {
            var batch: [(cookie: UInt64, first: Int, data: [UInt8])] = []
            var used = Set<Int>()
            for _ in 0..<(1 + Int(random.below(16))) {
                let count = 1 + Int(random.below(16))
                let first = Int(random.below(UInt64(blocks - count + 1)))
                guard used.isDisjoint(with: first..<(first + count)) else { continue }
                used.formUnion(first..<(first + count))
                counter += 1
                var data = [UInt8](repeating: 0, count: count * 4096)
                data.withUnsafeMutableBytes { fillRandom($0, seed: seed << 32 ^ counter) }
                batch.append((counter, first, data))
            }
            for write in batch {
                // Sent means it may land: the checker accepts it from now on.
                model.apply(write.data, at: write.first * 4096)
                client.request(
                    1, offset: UInt64(write.first * 4096), length: UInt32(write.data.count), cookie: write.cookie,
                    payload: write.data)
            }
            for _ in batch {
                guard let reply = client.reply() else { break serving }
                try #require(reply.error == 0, "seed \(seed) round \(round): a write failed with error \(reply.error)")
                figures.writesAcknowledged += 1
            }
            if random.chance(0.3) {
                client.request(3, offset: 0, length: 0, cookie: 0)
                guard let reply = client.reply() else { break serving }
                try #require(reply.error == 0, "seed \(seed) round \(round): a flush failed with error \(reply.error)")
                // Every write was acknowledged before the flush was sent: all of them are durable.
                model.committed()
                figures.flushesAcknowledged += 1
            }
        }
        // A reply that timed out without the kill having come: end the server all the same.
        if server.process.isRunning { usleep(UInt32(delay) * 1000) }
        if server.process.isRunning { kill(pid, SIGKILL) }
        server.process.waitUntilExit()
        #expect(
            server.process.terminationReason == .uncaughtSignal,
            "seed \(seed) round \(round): serve ended by itself: \(server.process.terminationStatus)")
        figures.killedServes += 1
    }

    /// Exports a volume through the CLI (which reassembles the array first) and returns its bytes.
    func export(_ name: String, round: Int) throws -> [UInt8] {
        let path = "\(exports)/\(name).bin"
        try? FileManager.default.removeItem(atPath: path)
        _ = try run(["volume", "export", "tank/\(name)", path] + dir, "round \(round): export \(name)")
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// The volume holds, block by block, what it held at its last acknowledged flush or a
    /// version sent since; that becomes the model. Snapshots must be exactly as taken.
    func verifyVolumes(round: Int, all: Bool) throws {
        let bytes = try export("v", round: round)
        try #require(
            bytes.count == model.current.count,
            "seed \(seed) round \(round): v is \(bytes.count) bytes, expected \(model.current.count)")
        for block in 0..<(bytes.count / 4096) {
            let range = (block * 4096)..<((block + 1) * 4096)
            let got = Array(bytes[range])
            if got != Array(model.durable[range]) && !model.versions[block].contains(got) {
                Issue.record(
                    "seed \(seed) round \(round): v block \(block) holds data the flush contract does not allow (neither its flushed contents nor a version written since)"
                )
                throw CrashCheckFailed()
            }
        }
        figures.blocksChecked += bytes.count / 4096
        model = StackSimulation.VolumeModel(bytes)
        guard all else { return }
        for (name, expected) in snapshots.sorted(by: { $0.key < $1.key }) {
            let got = try export(name, round: round)
            if let difference = byteDifference(got, expected) {
                Issue.record("seed \(seed) round \(round): snapshot \(name) changed: \(difference)")
                throw CrashCheckFailed()
            }
            figures.blocksChecked += got.count / 4096
        }
    }

    func volumes() throws -> [String: UInt64] {
        let listing = try run(["volume", "list", "tank", "--json"] + dir, "list volumes")
        let entries = try JSONSerialization.jsonObject(with: Data(listing.utf8)) as! [[String: Any]]
        return Dictionary(
            uniqueKeysWithValues: entries.map { ($0["name"] as! String, UInt64($0["sizeBytes"] as! Int)) })
    }

    /// How long each kind of command took when it ran to its end: kills land uniformly within it.
    var durations: [String: Int] = [:]

    /// Runs `arguments` and kills the process at a random moment of its usual run time.
    func killed(_ kind: String, _ arguments: [String], round: Int) throws {
        let limit = durations[kind] ?? 400
        let result = try spindleKilled(arguments, after: Int(random.below(UInt64(limit + 1))))
        if !result.killed { durations[kind] = max(durations[kind] ?? 0, result.milliseconds) }
        if result.killed {
            figures.killed[kind, default: 0] += 1
        } else {
            try #require(result.status == 0, "seed \(seed) round \(round): \(kind) failed: \(result.errors)")
            figures.finishedBeforeKill[kind, default: 0] += 1
        }
    }

    /// Runs one command that changes the pool or the array and kills it at a random moment; then
    /// finds out whether it happened, and requires either outcome to be complete.
    func killACommand(round: Int) throws {
        switch random.below(6) {
        case 0 where snapshots.count < 3:
            counter += 1
            let name = "s\(counter)"
            try killed("snapshot", ["volume", "snapshot", "tank/v", name, "--read-only"] + dir, round: round)
            if try volumes()[name] != nil { snapshots[name] = model.current }
        case 1:
            let size = (8 + Int(random.below(17))) << 20
            try killed("resize", ["volume", "resize", "tank/v", "--size", "\(size)", "--yes"] + dir, round: round)
            let now = Int(try #require(try volumes()["v"]))
            try #require(
                now == size || now == model.current.count,
                "seed \(seed) round \(round): after a killed resize to \(size) v is \(now) bytes (was \(model.current.count))"
            )
            model.resize(to: now)
            model.committed()
        case 2 where !snapshots.isEmpty:
            let name = snapshots.keys.sorted()[Int(random.below(UInt64(snapshots.count)))]
            try killed("delete", ["volume", "delete", "tank/\(name)", "--yes"] + dir, round: round)
            if try volumes()[name] == nil { snapshots[name] = nil }
        case 3:
            try killed("scrub --repair", ["array", "scrub", "--repair"] + arrayArguments, round: round)
        case 4:
            // Replace a member; the rebuild runs at a limited rate so that the kill can land in it.
            let old = members[Int(random.below(UInt64(members.count)))]
            let new = folder.file("m\(nextImage).img")
            nextImage += 1
            try killed(
                "replace", ["array", "replace"] + arrayArguments + ["--old", old, "--new", new, "--rate", "60M"],
                round: round)
            try finishRebuild(round: round, old: old, new: new)
        default:
            break
        }
    }

    /// Completes whatever a killed replace left — the old member still in place, a rebuild to
    /// finish (killed once more at random first), or the old member failed and no new one added
    /// yet (the replace is run again) — then drops the image that left the array.
    func finishRebuild(round: Int, old: String, new: String) throws {
        var slots = try slotDevices()
        let stateNow = try arrayStatus()["state"] as? String
        if !slots.contains(new) && stateNow != "clean" {
            // Killed between failing the old member and adding the new one: replace again.
            _ = try run(
                ["array", "replace"] + arrayArguments + ["--old", old, "--new", new, "--no-rebuild"],
                "round \(round): replace again")
            slots = try slotDevices()
        }
        if slots.contains(new) {
            if random.chance(0.5) {
                try killed("rebuild", ["array", "rebuild", "--wait", "--rate", "60M"] + arrayArguments, round: round)
            }
            let output = try run(["array", "rebuild", "--wait"] + arrayArguments, "round \(round): finish the rebuild")
            if !output.contains("nothing to rebuild") { figures.rebuildsResumed += 1 }
            try #require(!(try slotDevices()).contains(old))
            try FileManager.default.removeItem(atPath: old)
            members[members.firstIndex(of: old)!] = new
        } else {
            try #require(
                slots.contains(old),
                "seed \(seed) round \(round): after a killed replace neither \(old) nor \(new) is a member: \(slots)")
            try? FileManager.default.removeItem(atPath: new)
        }
        let state = try arrayStatus()["state"] as? String
        try #require(state == "clean", "seed \(seed) round \(round): after the rebuild the array is \(state ?? "?")")
    }

    func arrayStatus() throws -> [String: Any] {
        let status = try run(["array", "status", "--json"] + arrayArguments, "array status")
        return try JSONSerialization.jsonObject(with: Data(status.utf8)) as! [String: Any]
    }

    func slotDevices() throws -> Set<String> {
        let slots = try arrayStatus()["slots"] as! [[String: Any]]
        return Set(slots.compactMap { $0["device"] as? String })
    }

    func checkPoolAndScrub(round: Int) throws {
        let check = try spindle(["pool", "check", "tank"] + dir)
        try #require(
            check.status == 0 && check.output.contains("is clean"),
            "seed \(seed) round \(round): pool check: \(check.output) \(check.errors)")
        // Scrub exits 1 when it finds a mismatch: read its report either way.
        let scrub = try spindle(["array", "scrub", "--json"] + arrayArguments)
        try #require(
            scrub.status == 0 || scrub.status == 1, "seed \(seed) round \(round): scrub failed: \(scrub.errors)")
        let report = try JSONSerialization.jsonObject(with: Data(scrub.output.utf8)) as! [String: Any]
        try #require(
            report["mismatches"] as? Int == 0 && scrub.status == 0,
            "seed \(seed) round \(round): scrub after the crash: \(scrub.output)")
    }
}
