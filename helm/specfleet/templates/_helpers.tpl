{{/* Names and labels ------------------------------------------------------------------ */}}

{{- define "specfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified name; kept short because KubeRay derives pod/service names from it. */}}
{{- define "specfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "specfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "specfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "specfleet.labels" -}}
helm.sh/chart: {{ include "specfleet.chart" . }}
{{ include "specfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "specfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "specfleet.apiKeySecretName" -}}
{{- default (printf "%s-api-keys" (include "specfleet.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "specfleet.stateClaimName" -}}
{{- default (printf "%s-state" (include "specfleet.fullname" .)) .Values.state.existingClaim }}
{{- end }}

{{- define "specfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "specfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The model-cache volume source (head and GPU workers mount the same one). */}}
{{- define "specfleet.modelCacheVolume" -}}
{{- if eq .Values.modelCache.type "hostPath" }}
hostPath:
  path: {{ .Values.modelCache.hostPath | quote }}
  type: DirectoryOrCreate
{{- else if eq .Values.modelCache.type "pvc" }}
persistentVolumeClaim:
  claimName: {{ .Values.modelCache.existingClaim }}
{{- else }}
emptyDir:
  sizeLimit: {{ .Values.modelCache.sizeLimit }}
{{- end }}
{{- end }}

{{/* The HTTP port of the Serve proxies: serve.http.port of the ServeConfig (default 8000). */}}
{{- define "specfleet.servePort" -}}
{{- $http := default dict .Values.serve.http }}
{{- if hasKey $http "port" }}{{ $http.port | int }}{{ else }}8000{{ end }}
{{- end }}

{{/* Validation: bad values fail at render time with a message that names the key. ----- */}}

{{/*
GPU plan check. Each replica of serve.replicas needs tp x num_gpus GPUs (num_gpus: GPUs per TP
rank, default 1; tp "auto" is counted as 1, the planner picks it at start-up) on ONE node (Ray
STRICT_PACK placement group). Replicas are packed first-fit-decreasing onto
gpuWorkers.replicas nodes of gpuWorkers.gpusPerNode GPUs each; any replica that does not fit
fails the render.
*/}}
{{- define "specfleet.validateGpuPlan" -}}
{{- $perNode := .Values.gpuWorkers.gpusPerNode | float64 }}
{{- $nodes := .Values.gpuWorkers.replicas | int }}
{{- $sizes := list }}
{{- $total := 0.0 }}
{{- $count := 0 }}
{{- range $i, $spec := .Values.serve.replicas }}
  {{- $tp := 1 }}
  {{- if hasKey $spec "tp" }}{{- if ne (toString $spec.tp) "auto" }}{{ $tp = $spec.tp | int }}{{ end }}{{ end }}
  {{- $g := 1.0 }}
  {{- if hasKey $spec "num_gpus" }}{{- if not (kindIs "invalid" $spec.num_gpus) }}{{ $g = $spec.num_gpus | float64 }}{{ end }}{{ end }}
  {{- $need := mulf $tp $g }}
  {{- if gt $need $perNode }}
    {{- fail (printf "serve.replicas[%d]: one replica needs tp=%d x num_gpus=%v = %v GPUs, but a GPU worker node has only gpuWorkers.gpusPerNode=%v (a replica's TP ranks must share one node)" $i $tp $g $need $perNode) }}
  {{- end }}
  {{- $n := 1 }}
  {{- if hasKey $spec "count" }}{{ $n = $spec.count | int }}{{ end }}
  {{- range until $n }}
    {{- $sizes = append $sizes (printf "%012.4f" $need) }}
    {{- $total = addf $total $need }}
    {{- $count = add1 $count }}
  {{- end }}
{{- end }}
{{- $tps := list }}
{{- range .Values.serve.replicas }}{{ $tps = append $tps (toString (default 1 .tp)) }}{{ end }}
{{- if gt (len (uniq $tps)) 1 }}
  {{- fail (printf "serve.replicas mixes tp values %v: all replicas of one specfleet application share one Serve deployment and so one tp; install one release per tp" (uniq $tps)) }}
{{- end }}
{{- $free := list }}
{{- range until $nodes }}{{ $free = append $free $perNode }}{{ end }}
{{- range $s := reverse (sortAlpha $sizes) }}
  {{- $need := float64 $s }}
  {{- $placed := false }}
  {{- $next := list }}
  {{- range $f := $free }}
    {{- if and (not $placed) (ge $f $need) }}
      {{- $next = append $next (subf $f $need) }}
      {{- $placed = true }}
    {{- else }}
      {{- $next = append $next $f }}
    {{- end }}
  {{- end }}
  {{- $free = $next }}
  {{- if not $placed }}
    {{- $capacity := mulf $nodes $perNode }}
    {{- if gt $total $capacity }}
      {{- fail (printf "GPU plan does not fit: serve.replicas asks for %d replica(s) needing %v GPUs in total (count x tp x num_gpus), but the GPU worker group has gpuWorkers.replicas=%d node(s) x gpuWorkers.gpusPerNode=%v GPUs = %v GPUs; add nodes, raise gpusPerNode, or lower count/tp" $count $total $nodes $perNode $capacity) }}
    {{- else }}
      {{- fail (printf "GPU plan does not pack: %d replica(s) need %v of the %v GPUs, but a replica's TP ranks must share one node and a replica needing %v GPUs finds no node with that many free (gpuWorkers.replicas=%d x gpusPerNode=%v); use a tp that divides gpusPerNode" $count $total $capacity $need $nodes $perNode) }}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "specfleet.validate" -}}
{{- include "specfleet.validateGpuPlan" . }}
{{- $auth := default dict .Values.serve.auth }}
{{- if not $auth.keys_env }}
  {{- fail "serve.auth.keys_env must name the environment variable the chart fills from the API-key Secret (e.g. SPECFLEET_API_KEYS)" }}
{{- end }}
{{- $http := default dict .Values.serve.http }}
{{- if and (hasKey $http "host") (ne (toString $http.host) "0.0.0.0") }}
  {{- fail (printf "serve.http.host must be 0.0.0.0 in Kubernetes (the Serve proxy must listen on the pod IP), got %q" (toString $http.host)) }}
{{- end }}
{{- $persist := default dict .Values.serve.persistence }}
{{- if .Values.state.enabled }}
  {{- $path := toString (default "" $persist.sqlite_path) }}
  {{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.state.mountPath)) $path) }}
    {{- fail (printf "serve.persistence.sqlite_path (%q) must be a file under state.mountPath (%q) so the session registry survives restarts; or set state.enabled=false" $path .Values.state.mountPath) }}
  {{- end }}
{{- end }}
{{- if eq .Values.modelCache.type "hostPath" }}
  {{- if not .Values.modelCache.hostPath }}
    {{- fail "modelCache.type=hostPath needs modelCache.hostPath (a directory on the GPU node)" }}
  {{- end }}
{{- end }}
{{- if eq .Values.modelCache.type "pvc" }}
  {{- if not .Values.modelCache.existingClaim }}
    {{- fail "modelCache.type=pvc needs modelCache.existingClaim (the name of a PersistentVolumeClaim)" }}
  {{- end }}
{{- end }}
{{- end }}
