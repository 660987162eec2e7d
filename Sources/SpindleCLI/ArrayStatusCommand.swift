import ArgumentParser
import Foundation
import Spindle

extension ArrayCommand {
    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show an array's state, its members and any rebuild, from the superblocks (changes nothing).")

        @OptionGroup var selection: Selection

        @Flag(help: "Print the result as JSON.")
        var json = false

        func run() async throws {
            let report: Report
            if selection.scan != nil {
                let (_, array) = try await selection.scanned()
                report = Report(
                    array: array,
                    devices: array.members.map { Report.Device(path: $0.device, superblock: .success($0.superblock)) })
            } else {
                let discovery = try await Discovery.scan(paths: selection.images)
                // Of several arrays among the images, the one with the newest superblock.
                var newest: DiscoveredArray?
                for array in discovery.arrays where newest == nil || array.events > newest!.events { newest = array }
                report = Report(
                    array: newest,
                    devices: discovery.devices.map { Report.Device(path: $0.name, superblock: $0.superblock) })
            }
            if json {
                try Terminal.printJSON(report)
                return
            }
            for device in report.devices where device.problem != nil {
                Terminal.warning("\(device.path): \(device.problem!)")
            }
            guard let name = report.name, let array = report.array else {
                throw SpindleError(.invalidArgument, "none of the images is an array member")
            }
            print("array \(name): raid\(array.level.rawValue), \(report.state!)")
            print(
                "  size: \(ByteSize.format(array.capacityBytes)), \(array.memberCount) members, \(ByteSize.format(array.chunkBytes)) chunks, events \(array.events)"
            )
            for slot in array.slots {
                let holder =
                    slot.device.map { "  \($0)" }
                    ?? slot.lastKnownName.map {
                        "  (last seen as \($0)\(slot.memberUUID.map { ", member \($0)" } ?? ""))"
                    } ?? ""
                print("  slot \(slot.index): \(slot.state)\(holder)")
            }
            for spare in array.spares { print("  spare: \(spare)") }
            if report.integrity == true {
                print(
                    "  integrity: every member checks a CRC32C per 4 KiB block (bad blocks are rebuilt from redundancy)"
                )
            }
            if let rebuild = array.rebuild {
                let total = array.memberDataBytes
                print(
                    "  rebuild of slot \(rebuild.slot): \(ByteSize.format(rebuild.doneBytes)) of \(ByteSize.format(total)) (\(rebuild.doneBytes * 100 / max(total, 1))%), as of the last checkpoint"
                )
            }
            for note in report.notes { print("  note: \(note)") }
        }

        /// What `array status --json` prints: each image's superblock, the newest view of the array,
        /// and `notes` on images it does not use.
        struct Report: Encodable {
            struct Device: Encodable {
                var path: String
                var arrayName: String?
                var arrayUUID: String?
                var memberUUID: String?
                var role: Int?
                var events: UInt64?
                var problem: String?

                init(path: String, superblock: Result<RAIDSuperblock, RAIDSuperblock.Problem>) {
                    self.path = path
                    switch superblock {
                    case let .success(block):
                        arrayName = block.name
                        arrayUUID = block.arrayUUID.description
                        memberUUID = block.memberUUID.description
                        role = block.role
                        events = block.events
                    case let .failure(reason):
                        problem = reason.description
                    }
                }
            }

            struct Slot: Encodable {
                var slot: Int
                var device: String?
                var memberUUID: String?
                var lastKnownName: String?
                var state: RAIDMemberState
            }

            var devices: [Device]
            var name: String?
            var uuid: String?
            var level: Int?
            var chunkBytes: UInt64?
            var memberCount: Int?
            var capacityBytes: UInt64?
            var events: UInt64?
            var dirty: Bool?
            var slots: [Slot] = []
            var rebuildSlot: Int?
            var rebuildDoneBytes: UInt64?
            var memberDataBytes: UInt64?
            var state: String?
            var notes: [String] = []
            /// Whether the members lie under the integrity layer (checksums per 4 KiB block).
            var integrity: Bool?

            /// The array itself, for printing (not encoded).
            var array: DiscoveredArray?

            enum CodingKeys: String, CodingKey {
                case devices, name, uuid, level, chunkBytes, memberCount, capacityBytes, events, dirty, slots,
                    rebuildSlot,
                    rebuildDoneBytes, memberDataBytes, state, notes, integrity
            }

            init(array: DiscoveredArray?, devices: [Device]) {
                self.devices = devices
                self.array = array
                guard let array else { return }
                name = array.name
                uuid = array.uuid.description
                level = array.level.rawValue
                chunkBytes = array.chunkBytes
                memberCount = array.memberCount
                capacityBytes = array.capacityBytes
                events = array.events
                dirty = array.isDirty
                slots = array.slots.map {
                    Slot(
                        slot: $0.index, device: $0.device, memberUUID: $0.memberUUID?.description,
                        lastKnownName: $0.lastKnownName, state: $0.state)
                }
                rebuildSlot = array.rebuild?.slot
                rebuildDoneBytes = array.rebuild?.doneBytes
                memberDataBytes = array.memberDataBytes
                state = Self.words(array.state)
                notes = array.notes.map(\.description)
                integrity = !array.members.isEmpty && array.members.allSatisfy(\.checksummed)
            }

            /// The state as status has always printed it.
            static func words(_ state: DiscoveredArray.State) -> String {
                switch state {
                case .clean: return "clean"
                case .dirty: return "dirty (not shut down cleanly, or in use)"
                case .degraded: return "degraded"
                case .rebuilding: return "rebuilding"
                case .failed: return "failed"
                }
            }
        }
    }
}
