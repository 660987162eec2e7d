import Foundation
import Spindle

/// What the regular files of a folder are, read from their headers without opening them for
/// writing: array members (by their RAID superblock), images with a pool label, and files whose
/// superblock or label is damaged — each reported as "PATH: what is wrong; not used", never skipped
/// in silence. Files with neither header are passed over.
struct ImageScan {
    var members: [(path: String, superblock: RAIDSuperblock)] = []
    var labelled: [(path: String, label: ThinPoolLabel)] = []
    var damaged: [String] = []

    /// Reads the headers of every regular file in `folder` (in name order); `labels` also reads pool
    /// labels from the files that are not array members.
    init(_ folder: String, labels: Bool) async throws {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: folder) else {
            throw SpindleError(.notFound, "cannot list the folder", operation: "scan", path: folder)
        }
        for entry in entries.sorted() {
            let path = (folder as NSString).appendingPathComponent(entry)
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue,
                  let device = try? FileDevice.open(path: path, options: FileDevice.Options(readOnly: true, directIO: .disabled)) else { continue }
            switch try? await RAIDArray.readSuperblock(of: device) {
            case let .success(superblock)?:
                members.append((path, superblock))
            case let .failure(problem)? where problem != .notAMember:
                damaged.append("\(path): \(problem); not used")
            default:
                guard labels else { break }
                do {
                    if let label = try await ThinPoolLabel.read(from: device) { labelled.append((path, label)) }
                } catch let error as SpindleError {
                    damaged.append("\(path): \(error.message); not used")
                } catch {
                    damaged.append("\(path): \(error); not used")
                }
            }
            try? await device.close()
        }
    }
}
