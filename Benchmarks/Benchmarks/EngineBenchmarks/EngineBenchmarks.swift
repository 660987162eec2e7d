import Benchmark
import Glibc
@_spi(Benchmarks) import Spindle

// The engine's own cost per operation: no-ops through the ring (the kernel does no I/O), from tasks on
// the reactor (batched, no hand-off) and from the global executor (a locked inbox and a wake-up per
// request), one at a time and 32 in flight; and the BlockDevice path over memory, with no kernel at all.
// Allocations per operation are reported next to the time.

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.throughput, .wallClock, .cpuTotal, .mallocCountTotal],
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 1_000
    )
    let engine = try! IOEngine()

    Benchmark("engine nop, reactor task, depth 1") { benchmark in
        let count = benchmark.scaledIterations.count
        await engine.run {
            for _ in 0..<count { blackHole(await engine.execute(.nop)) }
        }
    }

    Benchmark("engine nop, reactor tasks, depth 32") { benchmark in
        let perWorker = max(1, benchmark.scaledIterations.count / 32)
        await engine.run {
            await withTaskGroup(of: Void.self) { group in
                for _ in 0..<32 {
                    group.addTask(executorPreference: engine) {
                        for _ in 0..<perWorker { blackHole(await engine.execute(.nop)) }
                    }
                }
            }
        }
    }

    Benchmark("engine nop, global executor, depth 1") { benchmark in
        for _ in benchmark.scaledIterations { blackHole(await engine.execute(.nop)) }
    }

    Benchmark("engine nop, global executor, depth 32") { benchmark in
        let perWorker = max(1, benchmark.scaledIterations.count / 32)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<32 {
                group.addTask {
                    for _ in 0..<perWorker { blackHole(await engine.execute(.nop)) }
                }
            }
        }
    }

    Benchmark("memory device 4 KiB read, reactor task") { benchmark in
        let device = try MemoryDevice(capacityBytes: 64 << 20, logicalBlockBytes: 4096)
        let buffer = AlignedBuffer(count: 4096)
        let count = benchmark.scaledIterations.count
        try await engine.run {
            var random = SeededRandom(seed: 1)
            for _ in 0..<count {
                try await device.read(into: buffer, at: random.below(16384) * 4096)
            }
        }
    }

    // Parity: ISA-L XOR of 4 x 64 KiB sources into a parity block, next to copying the same 256 KiB
    // with memcpy. Throughput is in operations (256 KiB of sources each).
    let sources = (0..<4).map { index -> AlignedBuffer in
        let buffer = AlignedBuffer(count: 65536)
        buffer.fill(UInt8(index + 1))
        return buffer
    }
    let parity = AlignedBuffer(count: 65536)
    let copyTarget = AlignedBuffer(count: 4 * 65536)

    Benchmark(
        "parity xor_gen 4 x 64 KiB", configuration: .init(metrics: [.throughput, .wallClock], scalingFactor: .one)
    ) { benchmark in
        for _ in benchmark.scaledIterations {
            XORParity.generate(sources: sources, into: parity, length: 65536)
            blackHole(parity.bytes[0])
        }
    }

    Benchmark("memcpy 4 x 64 KiB", configuration: .init(metrics: [.throughput, .wallClock], scalingFactor: .one)) {
        benchmark in
        for _ in benchmark.scaledIterations {
            for (index, source) in sources.enumerated() {
                memcpy(copyTarget.bytes.baseAddress! + index * 65536, source.bytes.baseAddress!, 65536)
            }
            blackHole(copyTarget.bytes[0])
        }
    }
}
