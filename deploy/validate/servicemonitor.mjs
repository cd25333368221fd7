// Validates ServiceMonitor objects (a JSON array in the file named by argv[2]) against
// prometheus-operator's CRD schema, as @kubernetes-models/prometheus-operator generates validators
// from it. Types, enums and patterns are checked; unknown fields are not (the CRD allows them).
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

let failed = 0;
for (const { file, object } of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const name = `${file}: ServiceMonitor ${object.metadata?.namespace}/${object.metadata?.name}`;
  try {
    new ServiceMonitor(object).validate();
    console.log(`ok    ${name} (monitoring.coreos.com/v1 CRD schema)`);
  } catch (e) {
    console.log(`ERROR ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
