/// One worker of a run: keeps one request in flight, through the layout pass, the measured phase
/// and the final read-back.
extension Bench {
    struct Worker: Sendable {
        let plan: Plan
        let shared: Shared
        let index: Int
        var random: SeededRandom
        let buffer: AlignedBuffer
        let scratch: AlignedBuffer
        var result = WorkerResult()

        init(plan: Plan, shared: Shared, index: Int) {
            self.plan = plan
            self.shared = shared
            self.index = index
            random = SeededRandom(seed: plan.options.seed &+ UInt64(index) &* 0x9E37_79B9)
            buffer = AlignedBuffer(count: plan.blockBytes)
            scratch = AlignedBuffer(count: plan.options.verify ? plan.blockBytes : 0)
            if !plan.options.verify {
                // Incompressible contents, written as they are for every request, as fio does.
                let words = buffer.bytes.bindMemory(to: UInt64.self)
                for word in words.indices { words[word] = random.next() }
            }
        }

        /// Writes the region sequentially in large requests.
        mutating func layout() async throws {
            let chunk = AlignedBuffer(count: plan.layoutChunkBytes)
            let chunkCount = (plan.regionBytes + UInt64(plan.layoutChunkBytes) - 1) / UInt64(plan.layoutChunkBytes)
            if !plan.options.verify {
                let words = chunk.bytes.bindMemory(to: UInt64.self)
                for word in words.indices { words[word] = random.next() }
            }
            while true {
                let chunkIndex = shared.cursor.add(1, ordering: .relaxed).oldValue
                if chunkIndex >= chunkCount { return }
                let start = chunkIndex * UInt64(plan.layoutChunkBytes)
                let length = Int(min(UInt64(plan.layoutChunkBytes), plan.regionBytes - start))
                if plan.options.verify {
                    for blockStart in stride(from: 0, to: length, by: plan.blockBytes) {
                        BlockPattern.fill(
                            chunk.slice(offset: blockStart, length: plan.blockBytes), seed: plan.options.seed,
                            offset: plan.regionOffset + start + UInt64(blockStart), serial: 0)
                    }
                }
                try await plan.device.write(from: chunk, range: 0..<length, at: plan.regionOffset + start)
                shared.completedBytes.add(UInt64(length), ordering: .relaxed)
                shared.completedOperations.add(1, ordering: .relaxed)
            }
        }

        /// The measured phase.
        mutating func measure() async throws {
            let deadline = shared.deadline
            let limit = shared.operationLimit
            let device = plan.device
            let pattern = plan.options.pattern
            let readFraction = pattern == .randrw ? Double(plan.options.readPercent) / 100 : (pattern.reads ? 1 : 0)
            let blockBytes = UInt64(plan.blockBytes)
            let verify = plan.options.verify
            var now = monotonicNanos()
            while !Task.isCancelled {
                if let limit {
                    if shared.issued.add(1, ordering: .relaxed).oldValue >= limit { return }
                } else if let deadline, now >= deadline {
                    return
                }
                let isRead = pattern == .randrw ? random.chance(readFraction) : pattern.reads
                if verify {
                    try await verifiedOperation(isRead: isRead)
                    now = monotonicNanos()
                    continue
                }
                let block =
                    pattern.isRandom
                    ? random.below(plan.blockCount)
                    : shared.cursor.add(1, ordering: .relaxed).oldValue % plan.blockCount
                let offset = plan.regionOffset + block * blockBytes
                let start = monotonicNanos()
                if isRead {
                    try await device.read(into: buffer, at: offset)
                } else {
                    try await device.write(from: buffer, at: offset)
                }
                now = monotonicNanos()
                if isRead { result.readLatency.record(now - start) } else { result.writeLatency.record(now - start) }
                shared.completedOperations.add(1, ordering: .relaxed)
                shared.completedBytes.add(blockBytes, ordering: .relaxed)
            }
        }

        /// One request in verify mode: the block is reserved so no other request touches it meanwhile.
        private mutating func verifiedOperation(isRead: Bool) async throws {
            let plan = self.plan
            let blockCount = plan.blockCount
            let sequential = !plan.options.pattern.isRandom
            var candidate =
                sequential
                ? shared.cursor.add(1, ordering: .relaxed).oldValue % blockCount
                : random.below(blockCount)
            var tries = 0
            let reservation: (block: UInt64, serial: UInt64)? = shared.verifyTable.withLock { table in
                while true {
                    let index = Int(candidate)
                    if !table.inFlight[index] && !(isRead && table.lastSerial[index] == VerifyTable.unwritten) {
                        table.inFlight[index] = true
                        if isRead { return (candidate, table.lastSerial[index]) }
                        let serial = table.nextSerial
                        table.nextSerial += 1
                        return (candidate, serial)
                    }
                    tries += 1
                    if tries > 64 { return nil }
                    candidate = sequential ? (candidate + 1) % blockCount : random.below(blockCount)
                }
            }
            guard let reservation else {
                await Task.yield()
                return
            }
            let offset = plan.regionOffset + reservation.block * UInt64(plan.blockBytes)
            defer { shared.verifyTable.withLock { $0.inFlight[Int(reservation.block)] = false } }
            let start = monotonicNanos()
            if isRead {
                try await plan.device.read(into: buffer, at: offset)
                let elapsed = monotonicNanos() - start
                try check(offset: offset, serial: reservation.serial)
                result.readLatency.record(elapsed)
            } else {
                BlockPattern.fill(buffer.bytes, seed: plan.options.seed, offset: offset, serial: reservation.serial)
                try await plan.device.write(from: buffer, at: offset)
                result.writeLatency.record(monotonicNanos() - start)
                shared.verifyTable.withLock { $0.lastSerial[Int(reservation.block)] = reservation.serial }
            }
            shared.completedOperations.add(1, ordering: .relaxed)
            shared.completedBytes.add(UInt64(plan.blockBytes), ordering: .relaxed)
        }

        private mutating func check(offset: UInt64, serial: UInt64) throws(SpindleError) {
            // A later run's random writes may have replaced the layout pass: checking what exists, any
            // write of this seed for this offset is accepted whole (lost writes are not told apart then).
            let problem =
                plan.options.verifyExisting
                ? BlockPattern.mismatchAnyWrite(
                    buffer.readOnlyBytes, seed: plan.options.seed, offset: offset, scratch: scratch.bytes)
                : BlockPattern.mismatch(
                    buffer.readOnlyBytes, seed: plan.options.seed, offset: offset, serial: serial,
                    scratch: scratch.bytes)
            if let problem {
                throw SpindleError(
                    .verificationFailed, problem, operation: "verify", path: plan.device.name, offset: offset,
                    length: UInt64(plan.blockBytes))
            }
            result.verifiedBlocks += 1
        }

        /// Reads back every block that holds known contents.
        mutating func verifyAll() async throws {
            while true {
                let block = shared.cursor.add(1, ordering: .relaxed).oldValue
                if block >= plan.blockCount { return }
                let serial = shared.verifyTable.withLock { $0.lastSerial[Int(block)] }
                if serial == VerifyTable.unwritten { continue }
                let offset = plan.regionOffset + block * UInt64(plan.blockBytes)
                try await plan.device.read(into: buffer, at: offset)
                try check(offset: offset, serial: serial)
                shared.completedBytes.add(UInt64(plan.blockBytes), ordering: .relaxed)
                shared.completedOperations.add(1, ordering: .relaxed)
            }
        }
    }
}
