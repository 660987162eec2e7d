import ArgumentParser
import Spindle

extension VolumeCommand {
    struct Diff: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the ranges of a volume that changed since another (changes nothing).",
            discussion: """
                Compares two volumes of one pool, usually a snapshot and its origin or two snapshots of one \
                chain: the ranges of NEW that may read other than in OLD, in whole chunks. The time grows \
                with what changed, not with the volumes' size. This is what an incremental backup copies \
                (see also `volume export --since`).
                """)

        @Argument(help: "POOL/OLD: the earlier volume (a snapshot).")
        var old: String

        @Argument(help: "POOL/NEW: the later volume (the origin, or a later snapshot).")
        var new: String

        @OptionGroup var folder: PoolFolder

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            let (poolName, oldName) = try PoolStore.split(old)
            let newName = try PoolStore.volume(new, inPool: poolName, option: "POOL/NEW")
            let (difference, elapsed) = try await PoolStore.withPool(poolName, folder: folder, readOnly: true) {
                pool, _ in
                let started = ContinuousClock.now
                let difference = try await pool.difference(from: oldName, to: newName)
                return (difference, ContinuousClock.now - started)
            }
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            if json {
                struct Output: Encodable {
                    var pool, from, to: String
                    var sizeBytes, chunkBytes, changedBytes: UInt64
                    var ranges: [ThinPool.VolumeDifference.Extent]
                    /// How long finding the difference took (the pool opened).
                    var elapsedSeconds: Double
                }
                try Terminal.printJSON(
                    Output(
                        pool: difference.pool, from: difference.from, to: difference.to,
                        sizeBytes: difference.sizeBytes, chunkBytes: difference.chunkBytes,
                        changedBytes: difference.changedBytes, ranges: difference.ranges, elapsedSeconds: seconds))
                return
            }
            print(
                "\(new) since \(old): \(ByteSize.format(difference.changedBytes)) changed in \(difference.ranges.count) range\(difference.ranges.count == 1 ? "" : "s") (of \(ByteSize.format(difference.sizeBytes)), in \(ByteSize.format(difference.chunkBytes)) chunks), found in \(formatDecimal(seconds * 1000, places: 1)) ms"
            )
            if !difference.ranges.isEmpty { print("      OFFSET       LENGTH") }
            for range in difference.ranges {
                print(String(range.offset).leftPadded(to: 12) + " " + String(range.length).leftPadded(to: 12))
            }
        }
    }
}
