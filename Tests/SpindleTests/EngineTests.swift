import Glibc
import Synchronization
import Testing

@testable import Spindle

@Suite("I/O engine", .serialized)
struct EngineTests {
    @Test("no-ops complete from the reactor and from other executors")
    func nopsFromEverywhere() async throws {
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let onReactor = await engine.run {
            var results: [Int32] = []
            for _ in 0..<100 { results.append(await engine.execute(.nop)) }
            return results
        }
        #expect(onReactor == [Int32](repeating: 0, count: 100))
        let fromGlobal = await withTaskGroup(of: Int32.self) { group in
            for _ in 0..<200 { group.addTask { await engine.execute(.nop) } }
            var results: [Int32] = []
            for await result in group { results.append(result) }
            return results
        }
        #expect(fromGlobal == [Int32](repeating: 0, count: 200))
    }

    @Test("operations past the waiting limit fail at once as overloaded; the rest complete")
    func waitingLimit() async throws {
        var configuration = IOEngine.Configuration()
        configuration.maximumInFlight = 2
        configuration.submissionQueueEntries = 4
        configuration.maximumWaiting = 3
        let engine = try IOEngine(configuration: configuration)
        defer { engine.shutdown() }
        // On the reactor the requests are started in order: 2 in flight, 3 waiting, the rest refused.
        let results = await engine.run {
            await withTaskGroup(of: Int32.self) { group in
                for _ in 0..<8 {
                    group.addTask(executorPreference: engine) { await engine.execute(.sleep(nanoseconds: 20_000_000)) }
                }
                var results: [Int32] = []
                for await result in group { results.append(result) }
                return results
            }
        }
        #expect(results.filter { $0 == -ETIME }.count == 5, "\(results)")
        #expect(results.filter { $0 == -ENOBUFS }.count == 3, "\(results)")
        let error = await #expect(throws: SpindleError.self) {
            try await engine.run {
                try await withThrowingTaskGroup(of: Int.self) { group in
                    for _ in 0..<8 {
                        group.addTask(executorPreference: engine) {
                            try await engine.perform(.sleep(nanoseconds: 20_000_000), operation: "sleep")
                        }
                    }
                    for try await _ in group {}
                }
            }
        }
        #expect(error?.code == .overloaded || error?.errno == ETIME, "\(String(describing: error))")
    }

    @Test("engine results become errors in one place: counts pass through, -errno is named")
    func resultsBecomeErrors() throws {
        #expect(try SpindleError.check(4096, operation: "read") == 4096)
        let error = #expect(throws: SpindleError.self) {
            try SpindleError.check(-EIO, operation: "read", path: "/tmp/a.img", offset: 8192, length: 4096)
        }
        #expect(error?.code == .ioFailed && error?.errno == EIO)
        #expect(
            error?.description == "read of 4096 bytes at offset 8192 on /tmp/a.img failed: Input/output error (errno 5)"
        )
        #expect(throws: SpindleError.self) { try SpindleError.check(-ENOBUFS, operation: "write") }
        #expect((try? SpindleError.check(-ENOBUFS, operation: "write")) == nil)
    }

    @Test("more operations than slots wait their turn and all complete")
    func overflowQueue() async throws {
        var configuration = IOEngine.Configuration()
        configuration.maximumInFlight = 4
        configuration.submissionQueueEntries = 4
        let engine = try IOEngine(configuration: configuration)
        defer { engine.shutdown() }
        for executor in [engine, nil] as [IOEngine?] {
            let completed = await withTaskGroup(of: Int32.self) { group in
                for index in 0..<300 {
                    group.addTask(executorPreference: executor) {
                        index % 3 == 0 ? await engine.execute(.sleep(nanoseconds: 100_000)) : await engine.execute(.nop)
                    }
                }
                var results: [Int32] = []
                for await result in group { results.append(result) }
                return results
            }
            #expect(completed.count == 300)
            #expect(completed.allSatisfy { $0 == 0 || $0 == -ETIME })
        }
    }

    @Test("sleep waits at least as long as asked")
    func sleepWaits() async throws {
        let engine = try IOEngine()
        defer { engine.shutdown() }
        let start = monotonicNanos()
        try await engine.sleep(nanoseconds: 20_000_000)
        #expect(monotonicNanos() - start >= 20_000_000)
    }

    @Test("shutdown with operations in flight fails them cleanly, then refuses new ones, and frees the ring")
    func shutdownInFlight() async throws {
        let ringsBefore = openDescriptors(matching: "io_uring")
        let engine = try IOEngine()
        #expect(openDescriptors(matching: "io_uring") == ringsBefore + 1)
        let results = ResultBox()
        let sleepers = Task {
            await withTaskGroup(of: Void.self) { group in
                for index in 0..<64 {
                    group.addTask(executorPreference: index % 2 == 0 ? engine : nil) {
                        let result = await engine.execute(.sleep(nanoseconds: 30_000_000_000))
                        results.values.withLock { $0.append(result) }
                    }
                }
            }
        }
        // Let the sleeps reach the ring, then stop the engine under them.
        try await Task.sleep(nanoseconds: 50_000_000)
        #expect(results.values.withLock { $0.isEmpty })
        let start = monotonicNanos()
        engine.shutdown()
        await sleepers.value
        #expect(monotonicNanos() - start < 10_000_000_000, "shutdown must not wait for 30 s sleeps")
        let collected = results.values.withLock { $0 }
        #expect(collected.count == 64)
        #expect(collected.allSatisfy { $0 == -ECANCELED || $0 == -EINTR })
        #expect(engine.isShutDown)
        #expect(await engine.execute(.nop) == -ECANCELED)
        let error = await spindleError { try await engine.sleep(nanoseconds: 1) }
        expectError(error, .closed, ["shut down"])
        #expect(openDescriptors(matching: "io_uring") == ringsBefore)
        engine.shutdown()  // a second shutdown is harmless
    }

    @Test("a task that prefers a shut-down engine carries on elsewhere")
    func tasksOutliveEngine() async throws {
        let engine = try IOEngine()
        let value = try await engine.run {
            engine.shutdown()
            try await Task.sleep(nanoseconds: 1_000_000)
            return await engine.execute(.nop)
        }
        #expect(value == -ECANCELED)
        engine.shutdown()
        #expect(engine.isShutDown)
    }

    @Test("the engine runs with and without DEFER_TASKRUN")
    func ringFlagVariants() async throws {
        for deferTaskRun in [true, false] {
            var configuration = IOEngine.Configuration()
            configuration.deferTaskRun = deferTaskRun
            configuration.submitBatch = 1
            let engine = try IOEngine(configuration: configuration)
            let results = await engine.run {
                await withTaskGroup(of: Int32.self) { group in
                    for _ in 0..<500 { group.addTask(executorPreference: engine) { await engine.execute(.nop) } }
                    var all: [Int32] = []
                    for await result in group { all.append(result) }
                    return all
                }
            }
            #expect(results.count == 500 && results.allSatisfy { $0 == 0 })
            engine.shutdown()
        }
    }
}

final class ResultBox: Sendable {
    let values = Locked<[Int32]>([])
}
